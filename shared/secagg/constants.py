"""Secure-aggregation message keys and stage names (one place, like Flower's ``secaggplus_constants``).

Every secure-aggregation message carries one ``ConfigRecord`` under :data:`SECAGG_RECORD` whose
``stage`` entry names the protocol stage; the other keys of that record are listed here per message.
"""

# Record keys inside a Flower RecordDict
SECAGG_RECORD = "secagg"  # ConfigRecord: the stage request (server -> client) or reply (client -> server)
MASKED_RECORD = "secagg-masked"  # ArrayRecord: {"masked": uint32 vector}; replaces the plain update record
MASKED_ARRAY = "masked"
CLIENT_STATE_RECORD = "secagg-state"  # ConfigRecord in context.state: the client's per-round protocol state
MASKING_STATE_RECORD = "secagg-masking"  # ConfigRecord in context.state while the train handler runs masked

# Node config keys (a site's own settings, never the server's)
NODE_REQUIRE_SECAGG = "require-secagg"  # true: refuse any train message without secure aggregation
NODE_MIN_COHORT = "secagg-min-cohort"  # fewest distinct roster sites a round must have (default 3)
NODE_THRESHOLD_FRACTION = "secagg-threshold-fraction"  # t >= ceil(f * m), f in [2/3, 1] (default 2/3)

# Stages, in protocol order
STAGE_ADVERTISE_KEYS = "advertise-keys"
STAGE_SHARE_KEYS = "share-keys"
STAGE_MASKED_INPUT = "masked-input"
STAGE_CONSISTENCY_CHECK = "consistency-check"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_ADVERTISE_KEYS, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT, STAGE_CONSISTENCY_CHECK, STAGE_UNMASK)

# Keys common to every stage record
KEY_STAGE = "stage"
KEY_RUN_ID = "run-id"
KEY_SERVER_ROUND = "server-round"
KEY_NODE_ID = "node-id"

# advertise-keys request: the round parameters (signed over by every client, through their digest)
KEY_NODE_IDS = "node-ids"
KEY_DEGREE = "degree"
KEY_THRESHOLD = "threshold"
KEY_CLIP_NORM = "clip-norm"
KEY_MAX_WEIGHT = "max-weight"
KEY_MAX_CLIENTS = "max-clients"
KEY_MODULUS_BITS = "modulus-bits"
# ... and, only in a round with distributed DP noise (shared/distributed_dp.py), its public noise numbers
KEY_DP_SCALE = "dp-scale"  # fixed-point units per 1.0 (a power of two)
KEY_DP_NOISE_STDDEV = "dp-noise-stddev"  # std of the aggregate noise, in fixed-point units
KEY_DP_SHARES = "dp-shares"  # M: the noise is split into M shares; fewer than M survivors abort the round

# advertise-keys reply: one signed key advert
KEY_SITE_ID = "site-id"
KEY_MASK_PUBLIC_KEY = "mask-public-key"
KEY_ENC_PUBLIC_KEY = "enc-public-key"
KEY_SEED_COMMITMENT = "seed-commitment"
KEY_SIGNATURE = "signature"

# share-keys request: every advert of the round (all sampled nodes that advertised), as parallel lists
KEY_ADVERT_NODE_IDS = "advert-node-ids"
KEY_ADVERT_SITE_IDS = "advert-site-ids"
KEY_ADVERT_MASK_KEYS = "advert-mask-public-keys"
KEY_ADVERT_ENC_KEYS = "advert-enc-public-keys"
KEY_ADVERT_COMMITMENTS = "advert-seed-commitments"
KEY_ADVERT_SIGNATURES = "advert-signatures"

# share-keys reply and masked-input request: encrypted shares, as parallel lists
KEY_PEER_NODE_IDS = "peer-node-ids"  # destinations (reply) or sources (request)
KEY_CIPHERTEXTS = "ciphertexts"
KEY_WEIGHT = "weight"  # masked-input request: the weight fixed for this client before the round

# consistency-check request (survivors, dropped) and reply (signature); unmask request (all four) and reply
KEY_SURVIVORS = "survivors"
KEY_DROPPED = "dropped"
KEY_SIGNER_IDS = "signer-node-ids"
KEY_SIGNATURES = "signatures"
KEY_SEED_OWNER_IDS = "seed-owner-ids"
KEY_SEED_SHARES = "seed-shares"
KEY_KEY_OWNER_IDS = "key-owner-ids"
KEY_KEY_SHARES = "key-shares"

# Domain-separation labels for signatures, key derivation and associated data
DOMAIN = "privatune/secagg/v1"
LABEL_ADVERT = "key-advert"
LABEL_PAIRWISE_MASK = "pairwise-mask"
LABEL_SELF_MASK = "self-mask"
LABEL_SHARE_KEY = "share-encryption-key"
LABEL_SHARE_AD = "share-ciphertext"
LABEL_PARAMS = "round-params"
LABEL_ADVERT_SET = "advert-set"
LABEL_GRAPH = "graph"
LABEL_SURVIVOR_SET = "survivor-set"
