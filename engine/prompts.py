"""Prompt files read into PromptItems: text (one prompt per line) or JSON Lines with ids, choices and answers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError


@dataclass
class PromptItem:
    """A prompt to generate from; with `answer` (an index into `choices`), a multiple-choice item to score."""

    id: str
    prompt: str
    choices: list[str] | None = None
    answer: int | None = None
    topic: str | None = None

    @property
    def is_choice(self) -> bool:
        return self.answer is not None


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Prompts from a text file (one per line; blank lines skipped) or, for .jsonl/.ndjson, JSON Lines
    (`prompt`, optional `choices`, `answer`, `topic`, `id`). Items without an id get p000, p001, …"""
    path = Path(path)
    if not path.is_file():
        raise HieruiError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HieruiError(f"prompts file {path} is not UTF-8 text") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    raw = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    width = max(3, len(str(len(raw) - 1)))
    items: list[PromptItem] = []
    seen: set[str] = set()
    for index, (number, line) in enumerate(raw):
        item = jsonl_item(path, number, line) if jsonl else PromptItem("", line)
        item.id = item.id or f"p{index:0{width}d}"
        if item.id in seen:
            raise HieruiError(f"{path} line {number}: prompt id '{item.id}' is used twice")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise HieruiError(f"prompts file {path} holds no prompts")
    return items


def jsonl_item(path: Path, number: int, line: str) -> PromptItem:
    """One line of a JSONL prompts file as a PromptItem (its id left "" when the line gives none)."""
    where = f"{path} line {number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise HieruiError(f"{where} is not valid JSON (a JSONL prompts file has one object per line)") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise HieruiError(f'{where} has no "prompt" (expected {{"prompt": "...", "choices": [...], "id": "..."}})')
    choices = obj.get("choices")
    if choices is not None and (
        not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices)
    ):
        raise HieruiError(f'{where}: "choices" must be a list of at least two non-empty strings')
    pid = ""
    if obj.get("id") is not None:
        pid = re.sub(r"[^A-Za-z0-9._]+", "_", str(obj["id"])).strip("._")
        if not pid:
            raise HieruiError(f'{where}: "id" {obj["id"]!r} has no letters or digits')
    answer = None
    if "answer" in obj:
        from engine.choice import answer_index

        if choices is None:
            raise HieruiError(f'{where}: an item with an "answer" needs "choices"')
        answer = answer_index(obj["answer"], choices, f"{where}: ")
    topic = obj.get("topic") if isinstance(obj.get("topic"), str) else None
    return PromptItem(pid, obj["prompt"], choices, answer, topic)
