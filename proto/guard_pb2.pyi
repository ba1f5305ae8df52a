from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    ACCEPTED: _ClassVar[Decision]
    REJECTED: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
ACCEPTED: Decision
REJECTED: Decision

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("request_id", "image", "tensor", "frame", "heatmap_png", "heatmap_values")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_VALUES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: bytes
    tensor: Tensor
    frame: int
    heatmap_png: bool
    heatmap_values: bool
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., frame: _Optional[int] = ..., heatmap_png: bool = ..., heatmap_values: bool = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "index", "probabilities")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probabilities: _containers.ScalarMap[str, float]
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probabilities: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("height", "width", "values", "png", "reference_values")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VALUES_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    values: _containers.RepeatedScalarFieldContainer[float]
    png: bytes
    reference_values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., png: _Optional[bytes] = ..., reference_values: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "bundle_hash")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    bundle_hash: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., bundle_hash: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "engine_ms", "guard_ms", "total_ms", "stages_ms", "batch_size")
    class StagesMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_MS_FIELD_NUMBER: _ClassVar[int]
    GUARD_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    STAGES_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    engine_ms: float
    guard_ms: float
    total_ms: float
    stages_ms: _containers.ScalarMap[str, float]
    batch_size: int
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., engine_ms: _Optional[float] = ..., guard_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., stages_ms: _Optional[_Mapping[str, float]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("request_id", "decision", "accepted", "reasons", "failed_measures", "scores", "thresholds", "prediction", "heatmap", "model", "timing", "detail", "input_format", "bit_depth", "sop_instance_uid")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    FAILED_MEASURES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    BIT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    decision: Decision
    accepted: bool
    reasons: _containers.RepeatedScalarFieldContainer[str]
    failed_measures: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.ScalarMap[str, float]
    thresholds: _containers.ScalarMap[str, float]
    prediction: Prediction
    heatmap: Heatmap
    model: ModelRef
    timing: Timing
    detail: str
    input_format: str
    bit_depth: int
    sop_instance_uid: str
    def __init__(self, request_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., accepted: bool = ..., reasons: _Optional[_Iterable[str]] = ..., failed_measures: _Optional[_Iterable[str]] = ..., scores: _Optional[_Mapping[str, float]] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., heatmap: _Optional[_Union[Heatmap, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., detail: _Optional[str] = ..., input_format: _Optional[str] = ..., bit_depth: _Optional[int] = ..., sop_instance_uid: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("channels", "height", "width", "mean", "std", "resize", "photometric")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PHOTOMETRIC_FIELD_NUMBER: _ClassVar[int]
    channels: int
    height: int
    width: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    resize: str
    photometric: str
    def __init__(self, channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., resize: _Optional[str] = ..., photometric: _Optional[str] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("alpha", "n", "measured_false_rejection_rate", "dataset", "facts_json")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FALSE_REJECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FACTS_JSON_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    n: int
    measured_false_rejection_rate: float
    dataset: str
    facts_json: str
    def __init__(self, alpha: _Optional[float] = ..., n: _Optional[int] = ..., measured_false_rejection_rate: _Optional[float] = ..., dataset: _Optional[str] = ..., facts_json: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "class_names", "garbage_class", "input", "file_hashes", "calibration", "policy", "enforced_checks", "engine", "providers", "info_json", "drift")
    class FileHashesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    GARBAGE_CLASS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    FILE_HASHES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_CHECKS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    class_names: _containers.RepeatedScalarFieldContainer[str]
    garbage_class: int
    input: InputSpec
    file_hashes: _containers.ScalarMap[str, str]
    calibration: Calibration
    policy: str
    enforced_checks: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    info_json: str
    drift: DriftStatus
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ..., garbage_class: _Optional[int] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., file_hashes: _Optional[_Mapping[str, str]] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ..., policy: _Optional[str] = ..., enforced_checks: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., info_json: _Optional[str] = ..., drift: _Optional[_Union[DriftStatus, _Mapping]] = ...) -> None: ...

class DriftStatus(_message.Message):
    __slots__ = ("available", "drift", "n", "rejection_rate", "per_check", "window_rejection_rate", "window_per_check", "window", "reference_rate", "alpha", "statistics", "threshold", "alarm_at", "alarm_by", "state_json")
    class PerCheckEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class WindowPerCheckEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class StatisticsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    REJECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    PER_CHECK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_REJECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_PER_CHECK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_RATE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ALARM_AT_FIELD_NUMBER: _ClassVar[int]
    ALARM_BY_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    available: bool
    drift: bool
    n: int
    rejection_rate: float
    per_check: _containers.ScalarMap[str, float]
    window_rejection_rate: float
    window_per_check: _containers.ScalarMap[str, float]
    window: int
    reference_rate: float
    alpha: float
    statistics: _containers.ScalarMap[str, float]
    threshold: float
    alarm_at: int
    alarm_by: _containers.RepeatedScalarFieldContainer[str]
    state_json: str
    def __init__(self, available: bool = ..., drift: bool = ..., n: _Optional[int] = ..., rejection_rate: _Optional[float] = ..., per_check: _Optional[_Mapping[str, float]] = ..., window_rejection_rate: _Optional[float] = ..., window_per_check: _Optional[_Mapping[str, float]] = ..., window: _Optional[int] = ..., reference_rate: _Optional[float] = ..., alpha: _Optional[float] = ..., statistics: _Optional[_Mapping[str, float]] = ..., threshold: _Optional[float] = ..., alarm_at: _Optional[int] = ..., alarm_by: _Optional[_Iterable[str]] = ..., state_json: _Optional[str] = ...) -> None: ...
