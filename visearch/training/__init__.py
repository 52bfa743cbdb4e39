"""Fine-tuning the embedder: losses, training on cached frozen features, same-item mining, export.

Needs torch (the `train` extra). Entry points: `visearch train --config configs/default.json`
and `visearch export --checkpoint runs/NAME/best.pt --repo model_repository` (docs/TRAINING.md).
"""
