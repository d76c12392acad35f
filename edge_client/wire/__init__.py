"""The FlexLoRA protocol: what the edge client and the server say to each other.

One package both sides import (the server depends on the client package, never the reverse):

* :mod:`.naming` -- peft naming (``<module>.lora_A.weight`` r x d_in, ``.lora_B.weight``
  d_out x r), ``scaling``, ``rank_for_module``, factor-dict split and join;
* :mod:`.messages` -- ``RankSpec``, ``ClientUpdate``, ``GlobalFactors``, ``DecodeLimits``;
* :mod:`.codec` -- safetensors + JSON bytes, with full validation of untrusted input;
* :mod:`.records` -- the Flower message keys and the typed ``NodeProbe`` / ``TrainOrder``.

Only numpy, safetensors and the standard library are needed to import it.
"""
from __future__ import annotations

from .codec import (
                    METADATA_KEY,
                    SCHEMA_VERSION,
                    WIRE_DTYPES,
                    decode_global,
                    decode_update,
                    encode_global,
                    encode_update,
                    json_loads_strict,
)
from .messages import (
    CONTRIBUTION_LIMIT,
    MAX_ROUND_REPLIES,
    ClientUpdate,
    DecodeLimits,
    GlobalFactors,
    RankSpec,
    product_norm,
)
from .naming import (
                    LORA_A_SUFFIX,
                    LORA_B_SUFFIX,
                    factor_keys,
                    group_factor_halves,
                    join_factors,
                    module_names,
                    rank_for_module,
                    scaling,
                    short_name,
                    split_factors,
)
from .records import METRICS_KEY, PROBE_KEY, QUERY_KEY, TRAIN_KEY, UPDATE_KEY, NodeProbe, TrainOrder, parse_rank_pattern

__all__ = ["LORA_A_SUFFIX", "LORA_B_SUFFIX", "SCHEMA_VERSION", "METADATA_KEY", "WIRE_DTYPES",
           "factor_keys", "group_factor_halves", "join_factors", "module_names", "rank_for_module", "scaling",
           "short_name", "split_factors", "RankSpec", "ClientUpdate", "GlobalFactors", "DecodeLimits",
           "encode_update", "decode_update", "encode_global", "decode_global", "json_loads_strict", "product_norm",
           "CONTRIBUTION_LIMIT", "MAX_ROUND_REPLIES",
           "QUERY_KEY", "PROBE_KEY", "TRAIN_KEY", "UPDATE_KEY", "METRICS_KEY", "NodeProbe", "TrainOrder",
           "parse_rank_pattern"]
