"""What the workers post to the app. Each reply carries the id of its request, so text from a reply the
user already stopped or cleared away is dropped instead of landing in the next one."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from .telemetry import Telemetry


@dataclass
class BackendReady(Message):
    name: str


@dataclass
class BackendFailed(Message):
    error: str


@dataclass
class ReplyText(Message):
    reply_id: int
    text: str


@dataclass
class ReplyFinished(Message):
    reply_id: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    usage: dict | None
    seconds: float  # from sending the request to the last chunk


@dataclass
class ReplyFailed(Message):
    reply_id: int
    error: str


@dataclass
class TelemetryUpdated(Message):
    telemetry: Telemetry

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TelemetryUpdated)  # only the newest frame matters
