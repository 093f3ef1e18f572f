"""Training and evaluation clips from the frame store: TSN sampling, clip-level augmentation, views.

Never re-decodes videos: a clip is T of the T_cache frames stored per video (JPEG-decoded only for
the frames it uses). Every random choice of a sample is drawn from its own stream seeded by
(seed, epoch, index), so a clip is the same whichever worker makes it and whether or not the run
was resumed in between.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import zarr

from pipeline.learning.transforms import AugmentConfig, Normalization, eval_views, train_transform
from pipeline.media.sampling import sample_rng, segment_indices, view_indices
from pipeline.storage.featurestore import read_rows
from pipeline.storage.framestore import read_boxes, read_frames, read_stored


class FrameClipSet(torch.utils.data.Dataset):
    """Clips of one split of a frame store: ``item(index, epoch, train)`` -> (clip, label).

    Training clips are [T, 3, S, S]; evaluation clips are [V, T, 3, S, S] with V = temporal views x
    spatial crops (1 x 1 by default: segment centres, centre crop).
    """

    def __init__(self, store_path: str, rows: np.ndarray, labels: np.ndarray, frames: int, norm: Normalization,
                 seed: int, aug: AugmentConfig | None = None, views: tuple[int, int] = (1, 1),
                 batched: bool = False) -> None:
        labels = np.asarray(labels)
        # class indices as int64 (what cross-entropy takes); multi-hot targets [n, C] as they are
        self.store_path, self.rows = str(store_path), np.asarray(rows)
        self.labels = labels.astype(np.int64) if labels.ndim == 1 else labels
        self.frames, self.norm, self.seed, self.aug, self.views = frames, norm, seed, aug or AugmentConfig(), views
        self._group: zarr.Group | None = None
        self._pid = -1
        self._transform = None
        # batched: items are the stored bytes of a clip's frames plus its drawn parameters, and
        # :meth:`finish` decodes and augments a whole batch on the training device (pipeline.learning.batchclips)
        self.batched = batched
        self._drawer = None

    def __len__(self) -> int:
        return len(self.rows)

    def group(self) -> zarr.Group:
        # Opened per process: a zarr handle must not cross a fork into DataLoader workers.
        if self._group is None or self._pid != os.getpid():
            self._group, self._pid = zarr.open_group(self.store_path, mode="r"), os.getpid()
            # opening an array reads its metadata: once per process, not once per clip
            self._frames_array = self._group["frames"]
            self._raw = self._group.attrs["codec"]["name"] == "raw"
            self._boxes = read_boxes(self._group)  # the whole column: one small read, not one per clip
        return self._group

    def box(self, row: int) -> tuple[int, int, int, int]:
        self.group()
        y0, y1, x0, x1 = (int(v) for v in self._boxes[row])
        return y0, y1, x0, x1

    def _picks(self, index: int, epoch: int, train: bool, t_cache: int) -> tuple[np.ndarray, int | None]:
        """The stored frames a clip uses, and (training) the seed of its augmentation draws: both from the
        clip's own stream, so the per-clip and the batched paths make the same clip."""
        if train:
            rng = sample_rng(self.seed, epoch, index)
            return segment_indices(t_cache, self.frames, rng), int(rng.integers(2**62))
        clips = self.views[0]
        return np.concatenate([view_indices(t_cache, self.frames, c, clips) for c in range(clips)]), None

    def item(self, index: int, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batched:
            return self.items([index], epoch, train)[0]
        group = self.group()
        row = int(self.rows[index])
        t_cache = self._frames_array.shape[1]
        label = torch.as_tensor(self.labels[index])
        y0, y1, x0, x1 = self.box(row)  # the video's own pixels: padding never enters a crop
        picks, seed = self._picks(index, epoch, train, t_cache)
        frames = torch.from_numpy(read_frames(group, row, picks)[:, y0:y1, x0:x1]).permute(0, 3, 1, 2)
        if train:
            if self._transform is None:
                self._transform = train_transform(self.norm, self.aug)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._transform(frames), label
        temporal, spatial = self.views
        views = [eval_views(frames[c * self.frames:(c + 1) * self.frames], self.norm, spatial) for c in range(temporal)]
        return torch.cat(views), label

    def items(self, indices: list[int], epoch: int, train: bool) -> list[tuple]:
        """Several clips at once. The batched path's worker share: one coordinate read of the stored bytes of every
        chosen frame of the batch (zarr's per-call cost paid once a batch, not once a clip), and each clip's
        augmentation drawn from its own stream, in the order the per-clip path draws."""
        if not self.batched:
            return [self.item(i, epoch, train) for i in indices]
        from pipeline.learning.batchclips import ClipDrawer, EncodedClip

        group = self.group()
        t_cache = self._frames_array.shape[1]
        rows = [int(self.rows[i]) for i in indices]
        picks, seeds = zip(*(self._picks(i, epoch, train, t_cache) for i in indices), strict=True)
        stored = read_stored(group, np.repeat(rows, [len(p) for p in picks]), np.concatenate(picks),
                             self._frames_array)
        if train and self._drawer is None:
            self._drawer = ClipDrawer(self.norm.image_size, self.aug)
        out, lo = [], 0
        for k, (i, row) in enumerate(zip(indices, rows, strict=True)):
            mine, lo = stored[lo:lo + len(picks[k])], lo + len(picks[k])
            box = self.box(row)
            draw = self._drawer.draw(len(mine), box[1] - box[0], box[3] - box[2], seeds[k]) if train else None
            frames = (torch.from_numpy(mine) if self._raw
                      else [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in mine])
            out.append((EncodedClip(frames, box, draw), torch.as_tensor(self.labels[i])))
        return out

    def finish(self, batch: list, device: torch.device | str, train: bool) -> torch.Tensor:
        """The device's share of the batched path: a batch of :meth:`item` inputs -> model inputs on ``device``."""
        from pipeline.learning.batchclips import eval_batch, train_batch

        if train:
            return train_batch(batch, device, self.norm, self.aug)
        return eval_batch(batch, device, self.norm, self.frames, self.views)


def usable_rows(group: zarr.Group, multilabel: bool = False,
                snapshot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a frame or feature store that decoded and carry a label: (rows, labels or multi-hot targets).

    Only rows live at ``snapshot`` (None: the store's current one): dropped videos are never served."""
    from pipeline.storage.store import live_mask

    status = group["status"][:]
    live = live_mask(group, snapshot)
    if multilabel and "targets" in group:
        targets = group["targets"][:]
        keep = np.flatnonzero(live & (status == 1) & (targets.sum(axis=1) > 0))
        return keep, targets[keep]
    labels = group["label"][:]
    keep = np.flatnonzero(live & (status == 1) & (labels >= 0))
    return keep, labels[keep]


class CachedFeatureSet(torch.utils.data.Dataset):
    """Clips of T frame features drawn TSN-style from the T_cache cached ones; ``views`` temporal views in eval."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, frames: int, seed: int, views: int = 1) -> None:
        self.features, self.frames, self.seed, self.views = features, frames, seed, views
        self.labels = np.asarray(labels).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.features.shape[1]
        if train:
            x = self.features[index, segment_indices(n, self.frames, sample_rng(self.seed, epoch, index))]
        else:
            x = np.stack([self.features[index, view_indices(n, self.frames, c, self.views)]
                          for c in range(self.views)])
        return torch.from_numpy(x.astype(np.float32)), torch.as_tensor(self.labels[index])


def load_split(group, snapshot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = usable_rows(group, snapshot=snapshot)
    return read_rows(group, rows), labels
