"""Class lists in words, for messages that compare a model's classes with a dataset's."""

from __future__ import annotations


def class_diff(old: list[str], new: list[str], old_name: str = "the champion",
               new_name: str = "this run") -> str:
    """How class list ``new`` differs from ``old``, in words."""
    gone, added = [c for c in old if c not in new], [c for c in new if c not in old]
    if not gone and not added:
        return "same classes, other order"
    parts = (f"only {old_name} has {class_names(gone)}" if gone else "",
             f"only {new_name} has {class_names(added)}" if added else "")
    return "; ".join(part for part in parts if part)


def class_names(classes: list[str], shown: int = 20) -> str:
    """A class list in a reason: all of it up to ``shown`` names (outcome.json has all)."""
    if len(classes) <= shown:
        return str(classes)
    return f"{len(classes)} classes {classes[:shown]} and {len(classes) - shown} more"
