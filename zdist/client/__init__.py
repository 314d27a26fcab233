"""The client side: Client, Future, LocalCluster and the batch-system clusters."""
