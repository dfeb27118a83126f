"""Protocol message keys shared by the ServerApp and the ClientApp (one place, like Flower's secaggplus_constants)."""

# Records in a train/evaluate request
GLOBAL_RECORD = "global"  # ArrayRecord: the global trainable tensors, by name
TRAIN_CONFIG_RECORD = "train-config"  # ConfigRecord: round, run id, task
EVALUATE_CONFIG_RECORD = "evaluate-config"  # ConfigRecord of an evaluate request: round (KEY_SERVER_ROUND)
CENTER_RECORD = "feature-center"  # ArrayRecord: {"center": the head's input center}, when center-features is on
CENTER_ARRAY = "center"

# Records in a train reply
UPDATE_RECORD = "update"  # ArrayRecord: {"update": flat float32 vector, clipped and weighted}
UPDATE_ARRAY = "update"
METRICS_RECORD = "metrics"  # MetricRecord: epsilon, train-loss, ...
DP_EVENT_RECORD = "dp-event"  # ConfigRecord: the round's DpEvent as data
DECLINE_RECORD = "decline"  # ConfigRecord: {"reason": str}; present instead of an update
ATTESTATION_RECORD = "attestation"  # ConfigRecord: site-signed epsilon attestation (ledger)

# Keys inside the train config
KEY_SERVER_ROUND = "server-round"
KEY_RUN_ID = "run-id"
KEY_TASK = "task"  # TASK_TRAIN (the default when absent) or TASK_FEATURE_MEAN

# Tasks of a train message
TASK_TRAIN = "train"  # a round of DP-SGD; the reply's update is the trainable tensors' delta
TASK_FEATURE_MEAN = "feature-mean"  # round 0 of a centered run: the reply's update is the site's noisy mean vector

# Metric names
METRIC_EPSILON = "epsilon"
METRIC_DELTA = "delta"
METRIC_TRAIN_LOSS = "train-loss"
