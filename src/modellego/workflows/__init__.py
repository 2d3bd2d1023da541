"""The file-level verbs: each loads and checks what it is given, gathers the data it needs,
calls one in-memory algorithm and returns the new model, its manifest and a report.

Layers (each imports only those to its left): ``errors`` -> ``data``, ``models`` -> ``io``,
``manifest`` -> ``surgery`` -> ``analysis`` -> in-memory algorithms (``disassemble_model``,
``compress_model``, ``assembly``) -> ``workflows`` -> ``cli``.
"""

from ..provenance import require_single, source_record
from .assembly import assemble
from .common import sample_calibration_images, task_data
from .compression import compress
from .disassembly import component_report, disassemble
from .reports import format_assembly, format_compress_report, format_report

__all__ = ["assemble", "compress", "component_report", "disassemble", "format_assembly",
           "format_compress_report", "format_report", "require_single",
           "sample_calibration_images", "source_record", "task_data"]
