"""The worker wing's Click commands: extract, and the work queue's prepare/work/verify."""
