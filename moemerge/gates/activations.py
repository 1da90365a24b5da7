"""The prompts' hidden states between two decoder layers, batch by batch, within a memory budget.

Below the budget they stay in memory. Above it they live in an unnamed temporary file, read and written one
batch at a time with pread/pwrite (not a memory map, whose touched pages would count as resident): a
10,000-prompt labelled set then costs disk space and page-cache traffic, not RAM. Each batch is overwritten
in place by the next layer's output, since a batch's output depends on that batch's input only.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from moemerge.errors import NO_ROOM, MoemergeError

DEFAULT_BUDGET = 512 * 2**20  # bytes of hidden states kept in memory before they go to disk


class Activations:
    """One tensor per prompt batch, [B, T, H] in `dtype`, kept in memory or in a temporary file."""

    def __init__(
        self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, budget: int = DEFAULT_BUDGET
    ) -> None:
        self.shapes, self.dtype, self.device = shapes, dtype, device
        itemsize = torch.empty(0, dtype=dtype).element_size()
        sizes = [math.prod(shape) * itemsize for shape in shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.on_disk = sum(sizes) > budget
        self._memory: list[torch.Tensor | None] = [None] * len(shapes)
        self._file = self._spill_file(sum(sizes)) if self.on_disk else None

    @staticmethod
    def _spill_file(size: int):
        """The temporary file, its whole size reserved now: a TMPDIR without room (or a `ulimit -f` below the
        size) is refused before the first layer, naming TMPDIR, not as a write error of the merge's output."""
        # closed by close(), which the `with` block the capture uses calls
        spill = tempfile.TemporaryFile(prefix="moemerge-activations-")  # noqa: SIM115
        try:
            os.posix_fallocate(spill.fileno(), 0, size)
        except OSError as exc:
            spill.close()
            if exc.errno not in NO_ROOM:
                raise
            raise MoemergeError(
                f"the gate pass keeps {size / 2**30:.1f} GiB of hidden states in a temporary file in "
                f"{tempfile.gettempdir()} (TMPDIR), which cannot hold it: {exc.strerror}; set TMPDIR to a folder "
                "with room"
            ) from None
        return spill

    def __enter__(self) -> Activations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._memory = [None] * len(self.shapes)
        if self._file is not None:
            self._file.close()

    def __setitem__(self, batch: int, hidden: torch.Tensor) -> None:
        if self._file is None:
            self._memory[batch] = hidden
            return
        raw = hidden.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).reshape(-1).numpy()
        view, offset = memoryview(raw), self.offsets[batch]
        while len(view):
            written = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[written:], offset + written

    def __getitem__(self, batch: int) -> torch.Tensor:
        if self._file is None:
            hidden = self._memory[batch]
            assert hidden is not None, f"batch {batch} was never stored"
            return hidden
        raw = torch.empty(self.sizes[batch], dtype=torch.uint8)
        view, offset = memoryview(raw.numpy()), self.offsets[batch]
        while len(view):
            read = os.preadv(self._file.fileno(), [view], offset)
            if read == 0:
                raise OSError(f"temporary activation file ended early at batch {batch}")
            view, offset = view[read:], offset + read
        return raw.view(self.dtype).reshape(self.shapes[batch]).to(self.device)
