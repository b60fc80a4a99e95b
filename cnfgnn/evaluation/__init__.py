"""cnfgnn.evaluation."""
