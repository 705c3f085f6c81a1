"""Strict YAML reading for the policy: every value checked for type and range, every
error a PolicyError that starts with ``file:line:``."""

from __future__ import annotations

import math
from typing import Any

import yaml

from extauthz.errors import ConfigError

Node = yaml.Node


class PolicyError(ConfigError):
    """The policy file is invalid; the message starts with ``file:line:``."""


class Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        # What loads but deserves a warning (a deprecated name), as "file:line: text".
        self.notices: list[str] = []

    def notice(self, node: Node, message: str) -> None:
        self.notices.append(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def error(self, node: Node, message: str) -> PolicyError:
        return PolicyError(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def mapping(self, node: Node, where: str, allowed: set[str]) -> dict[str, Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{where} must be a mapping")
        out: dict[str, Node] = {}
        for key_node, value in node.value:
            key = str(key_node.value)
            if allowed and key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(key_node, f"unknown key {key!r} in {where} (known: {known})")
            if key in out:
                raise self.error(key_node, f"{key!r} appears twice in {where}")
            out[key] = value
        return out

    def scalar(self, node: Node, where: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, f"{where} must be a single value")
        try:
            return yaml.safe_load(yaml.serialize(node))
        except yaml.YAMLError as exc:  # e.g. a !!python/object tag: never constructed
            problem = getattr(exc, "problem", None) or "cannot be read"
            raise self.error(node, f"{where}: {problem}") from None

    def integer(self, node: Node, where: str, minimum: int) -> int:
        value = self.scalar(node, where)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(node, f"{where} must be a whole number, not {value!r}")
        if value < minimum:
            raise self.error(node, f"{where} must be at least {minimum}, not {value}")
        return value

    def number(self, node: Node, where: str) -> float:
        value = self.scalar(node, where)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(node, f"{where} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise self.error(node, f"{where} must be a finite number, not {value!r}")
        if value < 0:
            raise self.error(node, f"{where} must not be negative, not {value}")
        return float(value)

    def boolean(self, node: Node, where: str) -> bool:
        value = self.scalar(node, where)
        if not isinstance(value, bool):
            raise self.error(node, f"{where} must be true or false, not {value!r}")
        return value

    def text(self, node: Node, where: str) -> str:
        value = self.scalar(node, where)
        if not isinstance(value, str) or not value:
            raise self.error(node, f"{where} must be a non-empty string")
        return value
