"""Data loading for EMCA-Train: ImageFolder datasets through DALI or torchvision, or synthetic batches.

    bundle = build_loaders(cfg.dataset, cfg.loader, rank=rank, world_size=world_size, device=device)
    for epoch in range(epochs):
        bundle.train.set_epoch(epoch)
        for images, labels in bundle.train: ...
"""
from emca.data.builder import DataBundle, build_loaders
from emca.data.config import DatasetConfig, LoaderConfig
from emca.data.errors import DatasetError

__all__ = ["DataBundle", "DatasetConfig", "DatasetError", "LoaderConfig", "build_loaders"]
