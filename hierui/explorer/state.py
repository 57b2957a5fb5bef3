"""The explorer's states: what the info bar shows and what the keys do depend on which one the app is in."""

from __future__ import annotations

from enum import Enum


class AppState(str, Enum):
    LOADING = "loading"  # a live explorer loading the models
    READY = "ready"  # a live run started, no step taken yet
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"  # the live run reached its end
    FAILED = "failed"  # loading, starting or stepping a live run failed
    REPLAY = "replay"  # a recorded session, standing still
    PLAYING = "playing"  # a recorded session played back step by step
