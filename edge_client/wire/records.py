"""The protocol's records on Flower: message keys and the typed probe and train records.

Every payload is a ``ConfigRecord`` in the Message's ``RecordDict``; adapters travel as the
bytes of :mod:`edge_client.wire.codec`, never pickle:

* ``query``  server -> node: ``{QUERY_KEY: {}}``; node -> server ``{PROBE_KEY: NodeProbe}``: who
  the node is and the rank its device affords.
* ``train``  server -> node: ``{TRAIN_KEY: TrainOrder}`` (no ``global``: start a fresh adapter);
  node -> server ``{UPDATE_KEY: {update: encode_update(...) bytes}, METRICS_KEY: MetricRecord}``.

flwr is imported only by ``to_record``, so the records can be built and checked without it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .codec import decode_global, json_loads_strict
from .messages import DecodeLimits, GlobalFactors, RankSpec, check_rank_pattern

__all__ = ["QUERY_KEY", "PROBE_KEY", "TRAIN_KEY", "UPDATE_KEY", "METRICS_KEY", "NodeProbe", "TrainOrder",
           "parse_rank_pattern"]

QUERY_KEY = "flexlora.query"
PROBE_KEY = "flexlora.probe"
TRAIN_KEY = "flexlora.train"
UPDATE_KEY = "flexlora.update"
METRICS_KEY = "metrics"
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_PROBE_JSON = 4096
_LIMITS = DecodeLimits()

def parse_rank_pattern(value) -> dict[str, int]:
    """``"gate_proj=16,up_proj=16"``, a JSON object string, or a mapping -> ``{name: rank}``."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, str) and value.strip().startswith("{"):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"rank-pattern is not valid JSON: {value!r} ({exc.msg})") from None
    elif isinstance(value, str):
        items = {}
        for part in value.split(","):
            key, sep, rank = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"rank-pattern entry {part!r} is not 'module=rank'")
            items[key.strip()] = rank.strip()
    else:
        raise ValueError(f"rank-pattern must be a string or mapping, got {type(value).__name__}")
    out = {}
    for key, rank in items.items():
        text = str(rank).strip()
        if isinstance(rank, bool) or not text.isdigit() or int(text) < 1:
            raise ValueError(f"rank-pattern[{key!r}] must be an int >= 1, got {rank!r}")
        out[str(key)] = int(text)
    return out


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


@dataclass(kw_only=True)
class NodeProbe:
    """What a node tells the server about itself (reply to ``query``)."""
    client_id: str
    rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    num_examples: int
    device: str = ""
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # everything here comes from an untrusted node and ends up in logs and file names
        if not isinstance(self.client_id, str) or not CLIENT_ID_RE.fullmatch(self.client_id):
            raise ValueError(f"client-id must be 1-64 characters of [A-Za-z0-9_.-], got {self.client_id!r:.80}")
        _positive_int("rank", self.rank)
        if self.rank > _LIMITS.max_rank:
            raise ValueError(f"rank {self.rank} is above the limit {_LIMITS.max_rank}")
        _positive_int("num-examples", self.num_examples)
        if self.num_examples > _LIMITS.max_num_examples:
            raise ValueError(f"num-examples {self.num_examples} is above the limit {_LIMITS.max_num_examples}")
        self.rank_pattern = check_rank_pattern(parse_rank_pattern(self.rank_pattern), _LIMITS.max_rank)
        if not isinstance(self.device, str) or len(self.device) > 256 or not self.device.isprintable():
            raise ValueError(f"device must be a printable string of at most 256 characters, got {self.device!r:.80}")
        if (not isinstance(self.reasons, list) or len(self.reasons) > 32
                or not all(isinstance(r, str) and len(r) <= 256 and r.isprintable() for r in self.reasons)):
            raise ValueError("reasons must be at most 32 printable strings of at most 256 characters")

    @property
    def spec(self) -> RankSpec:
        return RankSpec(rank=self.rank, rank_pattern=self.rank_pattern)

    def to_record(self):
        from flwr.app import ConfigRecord

        return ConfigRecord({"client-id": self.client_id, "rank": int(self.rank),
                             "rank-pattern": json.dumps(self.rank_pattern, sort_keys=True),
                             "num-examples": int(self.num_examples), "device": self.device,
                             "reasons": json.dumps(list(self.reasons))})

    @classmethod
    def from_record(cls, rec: Mapping) -> "NodeProbe":
        for key in ("client-id", "rank", "num-examples"):
            if key not in rec:
                raise ValueError(f"probe reply has no {key!r}")
        raw = rec.get("reasons", "[]")
        if not isinstance(raw, str) or len(raw) > MAX_PROBE_JSON:
            raise ValueError(f"probe 'reasons' must be a JSON string of at most {MAX_PROBE_JSON} characters")
        reasons = json_loads_strict(raw, "probe 'reasons'")
        pattern = rec.get("rank-pattern", "")
        if not isinstance(pattern, str) or len(pattern) > MAX_PROBE_JSON:
            raise ValueError(f"probe 'rank-pattern' must be a string of at most {MAX_PROBE_JSON} characters")
        if pattern.strip().startswith("{"):
            pattern = json_loads_strict(pattern, "probe 'rank-pattern'")
            if not isinstance(pattern, dict):
                raise ValueError("probe 'rank-pattern' must be a JSON object")
        if not isinstance(reasons, list):
            raise ValueError("probe 'reasons' must be a JSON list")
        return cls(client_id=rec["client-id"], rank=rec["rank"], rank_pattern=pattern,
                   num_examples=rec["num-examples"], device=rec.get("device", ""), reasons=reasons)


@dataclass(kw_only=True)
class TrainOrder:
    """One round's instructions for one node (the ``train`` message)."""
    client_id: str
    round: int
    seed: int
    rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    global_bytes: bytes | None = None          # encode_global(...); None: fresh adapter

    def __post_init__(self) -> None:
        _positive_int("round", self.round)
        _positive_int("rank", self.rank)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        self.rank_pattern = parse_rank_pattern(self.rank_pattern)

    @property
    def spec(self) -> RankSpec:
        return RankSpec(rank=self.rank, rank_pattern=self.rank_pattern)

    def to_record(self):
        from flwr.app import ConfigRecord

        rec = ConfigRecord({"client-id": self.client_id, "round": self.round, "seed": self.seed,
                            "rank": self.rank, "rank-pattern": json.dumps(self.rank_pattern, sort_keys=True)})
        if self.global_bytes is not None:
            rec["global"] = bytes(self.global_bytes)
        return rec

    @classmethod
    def from_record(cls, rec: Mapping) -> "TrainOrder":
        for key in ("client-id", "round", "seed", "rank"):
            if key not in rec:
                raise ValueError(f"train message has no {key!r}")
        data = rec.get("global")
        if data is not None and not isinstance(data, bytes):
            raise ValueError(f"train message 'global' must be bytes, got {type(data).__name__}")
        return cls(client_id=str(rec["client-id"]), round=rec["round"], seed=rec["seed"], rank=rec["rank"],
                   rank_pattern=rec.get("rank-pattern", ""), global_bytes=data)

    def init(self) -> GlobalFactors | None:
        return decode_global(self.global_bytes) if self.global_bytes is not None else None
