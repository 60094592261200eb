"""What runs on one device: agent loop, wire protocol, trainer, data shards. Imports nothing of the testbed."""
