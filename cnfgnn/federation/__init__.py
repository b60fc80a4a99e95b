"""cnfgnn.federation."""
