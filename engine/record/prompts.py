"""Prompt files read into PromptItems: text (one prompt per line) or JSON Lines with ids, choices and answers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HieruiError
from engine.record.validate import shown


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


MAX_ID = 80  # characters of a prompt id: it names files (ID-SPEC-MODE.jsonl), which allow 255 bytes


def short_id(pid: str, original: str) -> str:
    """`pid`, or where it is longer than MAX_ID its start and a hash of the whole original id (still unique)."""
    if len(pid) <= MAX_ID:
        return pid
    import hashlib

    digest = hashlib.sha1(original.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{pid[: MAX_ID - 13].rstrip('._')}-{digest}"


def read_prompts(path: str | Path, text: str | None = None, what: str = "--prompts") -> list[PromptItem]:
    """Prompts from a text file (one per line; blank lines skipped) or, for .jsonl/.ndjson, JSON Lines
    (`prompt`, optional `choices`, `answer`, `topic`, `id`). Items without an id get p000, p001, …
    `text`: the file's content, when it is not written yet (a recipe's prompts.jsonl before its sweep starts).
    The file is read as every text file a user names is (engine.record.texts.read_text_file; `what` names it)."""
    from engine.record.texts import read_text_file

    path = Path(path)
    lines = (read_text_file(path, what) if text is None else text).splitlines()
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    raw = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    width = max(3, len(str(len(raw) - 1)))
    items: list[PromptItem] = []
    seen: dict[str, tuple[int, bool]] = {}  # id → (its line, whether the line gave it)
    for index, (number, line) in enumerate(raw):
        item = jsonl_item(path, number, line) if jsonl else PromptItem("", line)
        explicit = bool(item.id)
        item.id = item.id or f"p{index:0{width}d}"
        if item.id in seen:
            raise _id_clash(path, item.id, seen[item.id], (number, explicit))
        seen[item.id] = (number, explicit)
        items.append(item)
    if not items:
        raise HieruiError(f"prompts file {path} holds no prompts")
    return items


def _id_clash(path: Path, pid: str, first: tuple[int, bool], second: tuple[int, bool]) -> HieruiError:
    """Two items with one id: blame the line that wrote it, not one that was numbered automatically."""
    (n1, explicit1), (n2, explicit2) = first, second
    if explicit1 and explicit2:
        return HieruiError(f"{path} line {n2}: prompt id '{pid}' is used twice (also on line {n1})")
    blamed, numbered = (n2, n1) if explicit2 else (n1, n2)
    return HieruiError(
        f"{path} line {blamed}: prompt id '{pid}' is also the id line {numbered} gets automatically "
        f"(items without an id are numbered p000, p001, …): choose another id"
    )


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
        raise HieruiError(f'{where}: "choices" must be a list of at least two non-empty strings, got {shown(choices)}')
    pid = ""
    if obj.get("id") is not None:
        pid = re.sub(r"[^A-Za-z0-9._]+", "_", str(obj["id"])).strip("._")
        if not pid:
            raise HieruiError(f'{where}: "id" {shown(obj["id"])} has no letters or digits')
        pid = short_id(pid, str(obj["id"]))
    answer = None
    if "answer" in obj:
        pass

        if choices is None:
            raise HieruiError(f'{where}: an item with an "answer" needs "choices"')
        answer = answer_index(obj["answer"], choices, f"{where}: ")
    topic = obj.get("topic") if isinstance(obj.get("topic"), str) else None
    return PromptItem(pid, obj["prompt"], choices, answer, topic)


def answer_index(answer, choices: list[str], where: str = "") -> int:
    """The answer as an index into `choices`: an int, or one of the choice strings."""
    from engine.record.validate import shown

    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    raise HieruiError(  # the value as the file wrote it (JSON): true, "E", 7
        f'{where}"answer" must be an index into "choices" (0..{len(choices) - 1}) or one of them, got {shown(answer)}'
    )
