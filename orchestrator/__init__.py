"""armature: ablation studies of small generative models on local GPUs, Ray clusters and rented Vast.ai instances."""
