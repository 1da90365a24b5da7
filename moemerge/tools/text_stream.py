"""Generated token ids to text that is safe to show: the engine's decoder, kept apart because its rules
(half-decoded characters, stop strings split over tokens) are tested on their own."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    """Token ids in, text out: decodes incrementally and holds back half-decoded characters and stop-string starts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded last time, as context for the next token
        self.text = ""  # decoded so far (cut at a stop string once one is seen)
        self.sent = 0  # text[:sent] has been handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(before) :]
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        else:
            end = len(self.text) if final else len(self.text) - self._held()
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

    def _held(self) -> int:
        """Length of the longest end of the unsent text that begins some stop string."""
        unsent = self.text[self.sent :]
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(unsent)), longest, -1):
                if unsent.endswith(stop[:n]):
                    longest = n
                    break
        return longest
