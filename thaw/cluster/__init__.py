"""What talks to a Kubernetes cluster: the Kubeflow Trainer TrainJob launcher (``trainjob``),
what it reads from node pods and events (``nodes``), and the training step that launches a
stage on several nodes (``launcher``). Nothing in the training library imports this package."""
