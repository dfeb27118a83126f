"""Each task's run-config presets: light (no torch), because :mod:`shared.config` applies them.

A preset replaces a key's value only where the run config leaves the key at :class:`shared.config.RunConfig`'s
default (which are the classifier's), in :meth:`shared.config.RunConfig.from_flower`: the server and every site
convert the same run config, so they agree on the values. A run that wants the classifier's default for a key
its task presets sets a value near it (a preset cannot tell "left at the default" from "set to the default").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CLASSIFY = "classify"
CAUSAL_LM = "causal-lm"
TASK_NAMES = (CLASSIFY, CAUSAL_LM)  # the run config's ``task`` values (shared.config.RunConfig.task)

# kebab-case run-config keys, as in pyproject.toml's [tool.flwr.app.config]
TASK_PRESETS: Mapping[str, Mapping[str, Any]] = {
    CLASSIFY: {},  # RunConfig's defaults are the classifier's
    # SmolLM2-135M-Instruct on the bundled reviews as instructions (docs/causal-lm.md): batches of 32 rows of up to
    # 128 tokens keep a CPU step in seconds; FFA-LoRA's B on q,k,v,o at lr 2 learnt the answer in 12 DP steps.
    CAUSAL_LM: {
        "num-server-rounds": 3,
        "model-path": "builtin:smollm2-135m-instruct",
        "data-path": "builtin:rotten-tomatoes-instruct",
        "lora-target-modules": "q_proj,k_proj,v_proj,o_proj",
        "center-features": False,
        "max-length": 128,
        "max-test-examples": 100,
        "batch-size": 32,
        "learning-rate": 2.0,
    },
}

# How many sites `privatune simulate` simulates when --num-clients is not given: each causal-LM site holds a
# 135M-parameter model and trains it on the CPU, so the default federation is small enough to finish in minutes.
SIMULATED_SITES: Mapping[str, int] = {CLASSIFY: 10, CAUSAL_LM: 3}

# A deployed site's node-config keys that only some tasks read (the classifier's file columns and label set), and
# those it must set: a site of another task that sets one is told so (a setting that silently did nothing would
# mislead its operator).
TASK_SITE_KEYS: Mapping[str, tuple[str, ...]] = {CLASSIFY: ("text-column", "label-column", "labels"), CAUSAL_LM: ()}
TASK_REQUIRED_SITE_KEYS: Mapping[str, tuple[str, ...]] = {CLASSIFY: ("labels",), CAUSAL_LM: ()}
