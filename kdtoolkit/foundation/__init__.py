"""Foundation: what every other layer stands on.

Owns errors (:mod:`.errors`), the one file writer and resource errors (:mod:`.io`), names that become
paths (:mod:`.paths`), bounds on what is read (:mod:`.limits`), safetensors files (:mod:`.tensorfiles`),
images read safely (:mod:`.images`), resumable checkpoints (:mod:`.checkpoint`), devices and autocast
(:mod:`.device`), torch.distributed (:mod:`.distributed`), progress bars (:mod:`.progress`), terminal and
Markdown tables (:mod:`.tables`) and the TOML writer (:mod:`.tomlwrite`).

May import: nothing of kdtoolkit outside this package (the lowest layer).

The public API is what this module exports (``__all__``); names are imported lazily, so importing
the package costs nothing until one is used.
"""

from __future__ import annotations

from kdtoolkit.foundation.lazy import lazy_exports

_EXPORTS = {
    "CHECKPOINT_FORMAT": "checkpoint",
    "Checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "DEVICE_PATTERN": "device",
    "DEVICE_CHOICES": "device",
    "check_device_spec": "device",
    "resolve_device": "device",
    "full_precision": "device",
    "autocast": "device",
    "collective_device": "device",
    "exit_now": "distributed",
    "Dist": "distributed",
    "shard_indices": "distributed",
    "KdtError": "errors",
    "RecipeError": "errors",
    "DataError": "errors",
    "CheckpointError": "errors",
    "PluginError": "errors",
    "TrainingError": "errors",
    "Interrupted": "errors",
    "MAX_PIXELS_ENV": "images",
    "DEFAULT_MAX_IMAGE_PIXELS": "images",
    "max_image_pixels": "images",
    "open_image": "images",
    "special_files_line": "images",
    "TEMP_SUFFIX": "io",
    "RESOURCE_ERRNOS": "io",
    "STALE_TEMP_SECONDS": "io",
    "is_resource_error": "io",
    "resource_error_message": "io",
    "atomic_write_bytes": "io",
    "atomic_savefig": "io",
    "atomic_save_image": "io",
    "open_for_update": "io",
    "append_line": "io",
    "remove_stale_temps": "io",
    "atomic_write_text": "io",
    "atomic_write_json": "io",
    "json_default": "io",
    "special_file_kind": "limits",
    "open_regular_file": "limits",
    "MAX_TEXT_BYTES": "limits",
    "read_text_file": "limits",
    "available_memory": "limits",
    "format_bytes": "limits",
    "NAME_RE": "paths",
    "MAX_NAME_LENGTH": "paths",
    "MAX_FILE_NAME_BYTES": "paths",
    "RUN_DIR_NAMES": "paths",
    "STAGE_DIR_NAMES": "paths",
    "RESERVED_NAMES": "paths",
    "RESERVED_RE": "paths",
    "REPORT_FIGURE_RE": "paths",
    "NAME_RULE": "paths",
    "key_name": "paths",
    "name_problem": "paths",
    "check_name": "paths",
    "safe_name": "paths",
    "inside": "paths",
    "Progress": "progress",
    "Number": "tables",
    "Table": "tables",
    "print_tables": "tables",
    "fmt": "tables",
    "CHECKSUM_KEY": "tensorfiles",
    "content_checksum": "tensorfiles",
    "atomic_save_safetensors": "tensorfiles",
    "MAX_HEADER_BYTES": "tensorfiles",
    "SafetensorsHeader": "tensorfiles",
    "read_safetensors_header": "tensorfiles",
    "read_safetensors": "tensorfiles",
    "load_external_state_dict": "tensorfiles",
    "decode_metadata": "tensorfiles",
    "read_kdt_safetensors": "tensorfiles",
    "read_kdt_metadata": "tensorfiles",
    "dumps": "tomlwrite",
    "lazy_exports": "lazy",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
