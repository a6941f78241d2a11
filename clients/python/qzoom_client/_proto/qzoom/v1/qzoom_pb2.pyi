from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_UNSPECIFIED: _ClassVar[Route]
    ROUTE_DIRECT: _ClassVar[Route]
    ROUTE_ZOOM: _ClassVar[Route]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_AUTO: _ClassVar[Mode]
    MODE_DIRECT: _ClassVar[Mode]
    MODE_ZOOM: _ClassVar[Mode]

class CoordSpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COORD_SPACE_UNSPECIFIED: _ClassVar[CoordSpace]
    COORD_SPACE_ORIGINAL: _ClassVar[CoordSpace]
    COORD_SPACE_INPUT: _ClassVar[CoordSpace]
    COORD_SPACE_NORM1000: _ClassVar[CoordSpace]
    COORD_SPACE_NORM1: _ClassVar[CoordSpace]
ROUTE_UNSPECIFIED: Route
ROUTE_DIRECT: Route
ROUTE_ZOOM: Route
MODE_UNSPECIFIED: Mode
MODE_AUTO: Mode
MODE_DIRECT: Mode
MODE_ZOOM: Mode
COORD_SPACE_UNSPECIFIED: CoordSpace
COORD_SPACE_ORIGINAL: CoordSpace
COORD_SPACE_INPUT: CoordSpace
COORD_SPACE_NORM1000: CoordSpace
COORD_SPACE_NORM1: CoordSpace

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class BoxSet(_message.Message):
    __slots__ = ("original", "input", "norm1000", "norm1")
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    NORM1000_FIELD_NUMBER: _ClassVar[int]
    NORM1_FIELD_NUMBER: _ClassVar[int]
    original: Box
    input: Box
    norm1000: Box
    norm1: Box
    def __init__(self, original: _Optional[_Union[Box, _Mapping]] = ..., input: _Optional[_Union[Box, _Mapping]] = ..., norm1000: _Optional[_Union[Box, _Mapping]] = ..., norm1: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class RoiMap(_message.Message):
    __slots__ = ("rows", "cols", "values")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class VisualTokens(_message.Message):
    __slots__ = ("coarse", "zoom")
    COARSE_FIELD_NUMBER: _ClassVar[int]
    ZOOM_FIELD_NUMBER: _ClassVar[int]
    coarse: int
    zoom: int
    def __init__(self, coarse: _Optional[int] = ..., zoom: _Optional[int] = ...) -> None: ...

class AnswerOptions(_message.Message):
    __slots__ = ("mode", "gate_threshold", "roi_threshold", "min_pixels", "max_pixels", "zoom_min_pixels", "zoom_max_pixels", "max_new_tokens", "prompt_suffix")
    MODE_FIELD_NUMBER: _ClassVar[int]
    GATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ROI_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    ZOOM_MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    ZOOM_MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    gate_threshold: float
    roi_threshold: float
    min_pixels: int
    max_pixels: int
    zoom_min_pixels: int
    zoom_max_pixels: int
    max_new_tokens: int
    prompt_suffix: str
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., gate_threshold: _Optional[float] = ..., roi_threshold: _Optional[float] = ..., min_pixels: _Optional[int] = ..., max_pixels: _Optional[int] = ..., zoom_min_pixels: _Optional[int] = ..., zoom_max_pixels: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., prompt_suffix: _Optional[str] = ...) -> None: ...

class UploadImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    def __init__(self, image: _Optional[bytes] = ...) -> None: ...

class UploadImageResponse(_message.Message):
    __slots__ = ("image_id", "width", "height", "input_width", "input_height", "already_stored")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    width: int
    height: int
    input_width: int
    input_height: int
    already_stored: bool
    def __init__(self, image_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., input_width: _Optional[int] = ..., input_height: _Optional[int] = ..., already_stored: _Optional[bool] = ...) -> None: ...

class AnswerRequest(_message.Message):
    __slots__ = ("image_id", "image", "question", "options")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    image: bytes
    question: str
    options: AnswerOptions
    def __init__(self, image_id: _Optional[str] = ..., image: _Optional[bytes] = ..., question: _Optional[str] = ..., options: _Optional[_Union[AnswerOptions, _Mapping]] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("answer", "route", "gate_score", "roi_box", "roi_map", "visual_tokens", "timings_ms", "cache_hit", "image_id", "generated_ids", "roi_source")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    GATE_SCORE_FIELD_NUMBER: _ClassVar[int]
    ROI_BOX_FIELD_NUMBER: _ClassVar[int]
    ROI_MAP_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_IDS_FIELD_NUMBER: _ClassVar[int]
    ROI_SOURCE_FIELD_NUMBER: _ClassVar[int]
    answer: str
    route: Route
    gate_score: float
    roi_box: BoxSet
    roi_map: RoiMap
    visual_tokens: VisualTokens
    timings_ms: _containers.ScalarMap[str, float]
    cache_hit: bool
    image_id: str
    generated_ids: _containers.RepeatedScalarFieldContainer[int]
    roi_source: str
    def __init__(self, answer: _Optional[str] = ..., route: _Optional[_Union[Route, str]] = ..., gate_score: _Optional[float] = ..., roi_box: _Optional[_Union[BoxSet, _Mapping]] = ..., roi_map: _Optional[_Union[RoiMap, _Mapping]] = ..., visual_tokens: _Optional[_Union[VisualTokens, _Mapping]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., cache_hit: _Optional[bool] = ..., image_id: _Optional[str] = ..., generated_ids: _Optional[_Iterable[int]] = ..., roi_source: _Optional[str] = ...) -> None: ...

class ZoomRegionRequest(_message.Message):
    __slots__ = ("image_id", "image", "crop_id", "box", "space", "question", "options", "label")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CROP_ID_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    image: bytes
    crop_id: str
    box: Box
    space: CoordSpace
    question: str
    options: AnswerOptions
    label: str
    def __init__(self, image_id: _Optional[str] = ..., image: _Optional[bytes] = ..., crop_id: _Optional[str] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., space: _Optional[_Union[CoordSpace, str]] = ..., question: _Optional[str] = ..., options: _Optional[_Union[AnswerOptions, _Mapping]] = ..., label: _Optional[str] = ...) -> None: ...

class ZoomRegionResponse(_message.Message):
    __slots__ = ("crop_png", "box", "crop_id", "crop_width", "crop_height", "answer", "visual_tokens", "timings_ms", "cache_hit", "image_id", "generated_ids")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CROP_PNG_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    CROP_ID_FIELD_NUMBER: _ClassVar[int]
    CROP_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CROP_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_IDS_FIELD_NUMBER: _ClassVar[int]
    crop_png: bytes
    box: BoxSet
    crop_id: str
    crop_width: int
    crop_height: int
    answer: str
    visual_tokens: VisualTokens
    timings_ms: _containers.ScalarMap[str, float]
    cache_hit: bool
    image_id: str
    generated_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, crop_png: _Optional[bytes] = ..., box: _Optional[_Union[BoxSet, _Mapping]] = ..., crop_id: _Optional[str] = ..., crop_width: _Optional[int] = ..., crop_height: _Optional[int] = ..., answer: _Optional[str] = ..., visual_tokens: _Optional[_Union[VisualTokens, _Mapping]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., cache_hit: _Optional[bool] = ..., image_id: _Optional[str] = ..., generated_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("model_loaded", "cache_reachable", "model_id", "version", "cache_backend")
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    CACHE_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    model_loaded: bool
    cache_reachable: bool
    model_id: str
    version: str
    cache_backend: str
    def __init__(self, model_loaded: _Optional[bool] = ..., cache_reachable: _Optional[bool] = ..., model_id: _Optional[str] = ..., version: _Optional[str] = ..., cache_backend: _Optional[str] = ...) -> None: ...
