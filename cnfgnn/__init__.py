"""cnfgnn: Cross-Node Federated Graph Neural Network for spatio-temporal forecasting."""
