"""Protocol message keys shared by the ServerApp and the ClientApp (one place, like Flower's secaggplus_constants)."""

# Records in a train/evaluate request
GLOBAL_RECORD = "global"  # ArrayRecord: the global trainable tensors, by name
TRAIN_CONFIG_RECORD = "train-config"  # ConfigRecord: round, run id, DP parameters planned by the run

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

# Metric names
METRIC_EPSILON = "epsilon"
METRIC_DELTA = "delta"
METRIC_TRAIN_LOSS = "train-loss"
