from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]

class TokenScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SCOPE_ALL: _ClassVar[TokenScope]
    TOKEN_SCOPE_PROMPT: _ClassVar[TokenScope]
    TOKEN_SCOPE_GENERATED: _ClassVar[TokenScope]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
TOKEN_SCOPE_ALL: TokenScope
TOKEN_SCOPE_PROMPT: TokenScope
TOKEN_SCOPE_GENERATED: TokenScope

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("model_name", "d_model", "available_layers", "dtype", "plugin_version", "engine", "tp_rank", "instance", "max_tokens_per_step", "shm_capable")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    SHM_CAPABLE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    d_model: int
    available_layers: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    plugin_version: str
    engine: str
    tp_rank: int
    instance: str
    max_tokens_per_step: int
    shm_capable: bool
    def __init__(self, model_name: _Optional[str] = ..., d_model: _Optional[int] = ..., available_layers: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., plugin_version: _Optional[str] = ..., engine: _Optional[str] = ..., tp_rank: _Optional[int] = ..., instance: _Optional[str] = ..., max_tokens_per_step: _Optional[int] = ..., shm_capable: _Optional[bool] = ...) -> None: ...

class ShmSlot(_message.Message):
    __slots__ = ("segment", "slot", "sequence", "nbytes")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    segment: str
    slot: int
    sequence: int
    nbytes: int
    def __init__(self, segment: _Optional[str] = ..., slot: _Optional[int] = ..., sequence: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ActivationBatch(_message.Message):
    __slots__ = ("step", "layers", "activations", "request_ids", "token_request_index", "positions", "is_generated", "captured_unix_s", "token_ids", "shm_slot")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_REQUEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    IS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOT_FIELD_NUMBER: _ClassVar[int]
    step: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    activations: Tensor
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    token_request_index: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    is_generated: _containers.RepeatedScalarFieldContainer[bool]
    captured_unix_s: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    shm_slot: ShmSlot
    def __init__(self, step: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., request_ids: _Optional[_Iterable[str]] = ..., token_request_index: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., is_generated: _Optional[_Iterable[bool]] = ..., captured_unix_s: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ..., shm_slot: _Optional[_Union[ShmSlot, _Mapping]] = ...) -> None: ...

class RequestStart(_message.Message):
    __slots__ = ("request_id", "api_request_id", "metadata", "traceparent", "prompt_tokens", "cached_prompt_tokens", "started_unix_s", "steering_policy")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    API_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STEERING_POLICY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    api_request_id: str
    metadata: _containers.ScalarMap[str, str]
    traceparent: str
    prompt_tokens: int
    cached_prompt_tokens: int
    started_unix_s: float
    steering_policy: str
    def __init__(self, request_id: _Optional[str] = ..., api_request_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., traceparent: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., started_unix_s: _Optional[float] = ..., steering_policy: _Optional[str] = ...) -> None: ...

class RequestFinish(_message.Message):
    __slots__ = ("request_id", "generated_tokens", "finish_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    generated_tokens: int
    finish_reason: str
    def __init__(self, request_id: _Optional[str] = ..., generated_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class PluginStats(_message.Message):
    __slots__ = ("batches_enqueued", "batches_dropped_queue_full", "batches_sent", "tokens_tapped", "enqueue_seconds_sum", "enqueue_count", "reconnects", "cached_prompt_tokens_untapped", "steering_rows_applied", "directives_rejected", "queue_depth", "queue_capacity", "policy_tokens_steered", "rule_tokens_steered")
    class PolicyTokensSteeredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RuleTokensSteeredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BATCHES_ENQUEUED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_DROPPED_QUEUE_FULL_FIELD_NUMBER: _ClassVar[int]
    BATCHES_SENT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TAPPED_FIELD_NUMBER: _ClassVar[int]
    ENQUEUE_SECONDS_SUM_FIELD_NUMBER: _ClassVar[int]
    ENQUEUE_COUNT_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_UNTAPPED_FIELD_NUMBER: _ClassVar[int]
    STEERING_ROWS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    POLICY_TOKENS_STEERED_FIELD_NUMBER: _ClassVar[int]
    RULE_TOKENS_STEERED_FIELD_NUMBER: _ClassVar[int]
    batches_enqueued: int
    batches_dropped_queue_full: int
    batches_sent: int
    tokens_tapped: int
    enqueue_seconds_sum: float
    enqueue_count: int
    reconnects: int
    cached_prompt_tokens_untapped: int
    steering_rows_applied: int
    directives_rejected: int
    queue_depth: int
    queue_capacity: int
    policy_tokens_steered: _containers.ScalarMap[str, int]
    rule_tokens_steered: _containers.ScalarMap[str, int]
    def __init__(self, batches_enqueued: _Optional[int] = ..., batches_dropped_queue_full: _Optional[int] = ..., batches_sent: _Optional[int] = ..., tokens_tapped: _Optional[int] = ..., enqueue_seconds_sum: _Optional[float] = ..., enqueue_count: _Optional[int] = ..., reconnects: _Optional[int] = ..., cached_prompt_tokens_untapped: _Optional[int] = ..., steering_rows_applied: _Optional[int] = ..., directives_rejected: _Optional[int] = ..., queue_depth: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., policy_tokens_steered: _Optional[_Mapping[str, int]] = ..., rule_tokens_steered: _Optional[_Mapping[str, int]] = ...) -> None: ...

class PluginMessage(_message.Message):
    __slots__ = ("hello", "batch", "request_start", "request_finish", "stats", "lane_open")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_START_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FINISH_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LANE_OPEN_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: ActivationBatch
    request_start: RequestStart
    request_finish: RequestFinish
    stats: PluginStats
    lane_open: LaneOpen
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[ActivationBatch, _Mapping]] = ..., request_start: _Optional[_Union[RequestStart, _Mapping]] = ..., request_finish: _Optional[_Union[RequestFinish, _Mapping]] = ..., stats: _Optional[_Union[PluginStats, _Mapping]] = ..., lane_open: _Optional[_Union[LaneOpen, _Mapping]] = ...) -> None: ...

class LaneOpen(_message.Message):
    __slots__ = ("lane",)
    LANE_FIELD_NUMBER: _ClassVar[int]
    lane: str
    def __init__(self, lane: _Optional[str] = ...) -> None: ...

class Clamp(_message.Message):
    __slots__ = ("source", "feature", "encoder", "bias", "threshold", "decoder", "value", "gate_encoder", "gate_bias")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GATE_ENCODER_FIELD_NUMBER: _ClassVar[int]
    GATE_BIAS_FIELD_NUMBER: _ClassVar[int]
    source: str
    feature: int
    encoder: Tensor
    bias: float
    threshold: float
    decoder: Tensor
    value: float
    gate_encoder: Tensor
    gate_bias: float
    def __init__(self, source: _Optional[str] = ..., feature: _Optional[int] = ..., encoder: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[float] = ..., threshold: _Optional[float] = ..., decoder: _Optional[_Union[Tensor, _Mapping]] = ..., value: _Optional[float] = ..., gate_encoder: _Optional[_Union[Tensor, _Mapping]] = ..., gate_bias: _Optional[float] = ...) -> None: ...

class AddDirection(_message.Message):
    __slots__ = ("direction", "scale")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    direction: Tensor
    scale: float
    def __init__(self, direction: _Optional[_Union[Tensor, _Mapping]] = ..., scale: _Optional[float] = ...) -> None: ...

class SteeringAction(_message.Message):
    __slots__ = ("layer", "clamp", "add")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CLAMP_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    clamp: Clamp
    add: AddDirection
    def __init__(self, layer: _Optional[int] = ..., clamp: _Optional[_Union[Clamp, _Mapping]] = ..., add: _Optional[_Union[AddDirection, _Mapping]] = ...) -> None: ...

class SteeringDirective(_message.Message):
    __slots__ = ("directive_id", "request_id", "rule", "from_position", "actions", "cancel")
    DIRECTIVE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    FROM_POSITION_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    directive_id: str
    request_id: str
    rule: str
    from_position: int
    actions: _containers.RepeatedCompositeFieldContainer[SteeringAction]
    cancel: bool
    def __init__(self, directive_id: _Optional[str] = ..., request_id: _Optional[str] = ..., rule: _Optional[str] = ..., from_position: _Optional[int] = ..., actions: _Optional[_Iterable[_Union[SteeringAction, _Mapping]]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class SteeringPolicy(_message.Message):
    __slots__ = ("name", "selector", "actions")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    selector: _containers.ScalarMap[str, str]
    actions: _containers.RepeatedCompositeFieldContainer[SteeringAction]
    def __init__(self, name: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., actions: _Optional[_Iterable[_Union[SteeringAction, _Mapping]]] = ...) -> None: ...

class TapPlan(_message.Message):
    __slots__ = ("layers", "scope", "steering_enabled", "steering_failure_mode", "policies", "rules_version", "max_batch_bytes", "shm_ring")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    STEERING_ENABLED_FIELD_NUMBER: _ClassVar[int]
    STEERING_FAILURE_MODE_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_RING_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    scope: TokenScope
    steering_enabled: bool
    steering_failure_mode: str
    policies: _containers.RepeatedCompositeFieldContainer[SteeringPolicy]
    rules_version: int
    max_batch_bytes: int
    shm_ring: ShmRing
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., scope: _Optional[_Union[TokenScope, str]] = ..., steering_enabled: _Optional[bool] = ..., steering_failure_mode: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[SteeringPolicy, _Mapping]]] = ..., rules_version: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ..., shm_ring: _Optional[_Union[ShmRing, _Mapping]] = ...) -> None: ...

class ShmRing(_message.Message):
    __slots__ = ("path", "slots", "slot_bytes", "nonce", "lane")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    path: str
    slots: int
    slot_bytes: int
    nonce: bytes
    lane: str
    def __init__(self, path: _Optional[str] = ..., slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., nonce: _Optional[bytes] = ..., lane: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("step", "credits", "rejected_reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    credits: int
    rejected_reason: str
    def __init__(self, step: _Optional[int] = ..., credits: _Optional[int] = ..., rejected_reason: _Optional[str] = ...) -> None: ...

class SidecarMessage(_message.Message):
    __slots__ = ("plan", "directive", "ack")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    plan: TapPlan
    directive: SteeringDirective
    ack: Ack
    def __init__(self, plan: _Optional[_Union[TapPlan, _Mapping]] = ..., directive: _Optional[_Union[SteeringDirective, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class GetRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RuleSet(_message.Message):
    __slots__ = ("yaml", "version", "author", "updated_unix_s", "source", "store")
    YAML_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    version: int
    author: str
    updated_unix_s: float
    source: str
    store: str
    def __init__(self, yaml: _Optional[str] = ..., version: _Optional[int] = ..., author: _Optional[str] = ..., updated_unix_s: _Optional[float] = ..., source: _Optional[str] = ..., store: _Optional[str] = ...) -> None: ...

class PutRulesRequest(_message.Message):
    __slots__ = ("yaml", "author", "dry_run")
    YAML_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    author: str
    dry_run: bool
    def __init__(self, yaml: _Optional[str] = ..., author: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RuleError(_message.Message):
    __slots__ = ("file", "rule", "field", "message")
    FILE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    file: str
    rule: str
    field: str
    message: str
    def __init__(self, file: _Optional[str] = ..., rule: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PutRulesResponse(_message.Message):
    __slots__ = ("ok", "version", "errors", "rules", "policies", "written_to")
    OK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_TO_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    version: int
    errors: _containers.RepeatedCompositeFieldContainer[RuleError]
    rules: int
    policies: int
    written_to: str
    def __init__(self, ok: _Optional[bool] = ..., version: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[RuleError, _Mapping]]] = ..., rules: _Optional[int] = ..., policies: _Optional[int] = ..., written_to: _Optional[str] = ...) -> None: ...

class KillSwitchRequest(_message.Message):
    __slots__ = ("steering_enabled", "author")
    STEERING_ENABLED_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    steering_enabled: bool
    author: str
    def __init__(self, steering_enabled: _Optional[bool] = ..., author: _Optional[str] = ...) -> None: ...

class KillSwitchState(_message.Message):
    __slots__ = ("steering_enabled",)
    STEERING_ENABLED_FIELD_NUMBER: _ClassVar[int]
    steering_enabled: bool
    def __init__(self, steering_enabled: _Optional[bool] = ...) -> None: ...

class TailAlertsRequest(_message.Message):
    __slots__ = ("last", "follow")
    LAST_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    last: int
    follow: bool
    def __init__(self, last: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("event_id", "kind", "rule", "severity", "request_id", "api_request_id", "unix_s", "json")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    API_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    UNIX_S_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    kind: str
    rule: str
    severity: str
    request_id: str
    api_request_id: str
    unix_s: float
    json: str
    def __init__(self, event_id: _Optional[str] = ..., kind: _Optional[str] = ..., rule: _Optional[str] = ..., severity: _Optional[str] = ..., request_id: _Optional[str] = ..., api_request_id: _Optional[str] = ..., unix_s: _Optional[float] = ..., json: _Optional[str] = ...) -> None: ...
