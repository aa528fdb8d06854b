"""``FFRecordDataset``: a torch Dataset over FFRecord files (local or fs3), read in batches.

Two ways to use it with a DataLoader::

    ds = FFRecordDataset("/data/train", fs=fs3.FileSystem(), transform=decode)
    # 1. ffrecord's style: the sampler yields lists of indices, the dataset reads each list at once
    dl = DataLoader(ds, sampler=BatchSampler(RandomSampler(ds), 256, False), batch_size=None, num_workers=4)
    # 2. torch's batched hook: a plain batch_size DataLoader calls __getitems__(indices)
    dl = DataLoader(ds, batch_size=256, shuffle=True, num_workers=4)

``transform(bytes) -> sample`` decodes one sample (default: the bytes themselves). The dataset is
fork-safe: each worker process reopens the files (local) or makes its own fs3 FileSystem (fs3),
so no descriptor or connection is shared across a fork; the parsed headers travel with it.

torch is imported only here (fs3's other modules do not need it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from .ffrecord import FileReader


class FFRecordDataset(Dataset):
    """Samples of FFRecord files as a map-style Dataset; ``ds[i]`` is one sample, ``ds[[i, j, ...]]``
    a list of samples read with one batched read."""

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], fs: Any = None,
                 check_data: bool = True, transform: Callable[[bytes], Any] | None = None) -> None:
        self.reader = FileReader(path, check_data=check_data, fs=fs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.reader)

    def _decode(self, datas: list[bytes]) -> list[Any]:
        t = self.transform
        return datas if t is None else [t(d) for d in datas]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (list, tuple)) or (hasattr(index, "__len__") and hasattr(index, "tolist")):
            return self.__getitems__(index if isinstance(index, (list, tuple)) else index.tolist())
        return self._decode(self.reader.read([int(index)]))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        return self._decode(self.reader.read(indices))

    def close(self) -> None:
        self.reader.close()
