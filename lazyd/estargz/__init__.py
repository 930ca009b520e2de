"""The eStargz layer format: footer, TOC model and validation, chunk decode + verify,
random-access reader and parallel writer.  See docs/design.md ("eStargz API")."""

from lazyd.estargz.chunk import decode_chunk
from lazyd.estargz.errors import (
    BuildError,
    ChunkDigestMismatch,
    EStargzError,
    FooterError,
    NotARegularFileError,
    TOCDigestMismatch,
    TOCError,
    TruncatedBlobError,
    UnsafePathError,
)
from lazyd.estargz.footer import FOOTER_SIZE, LEGACY_FOOTER_SIZE, Footer, footer_bytes, parse_footer, read_footer
from lazyd.estargz.reader import RangeSource, Reader, file_source, open_file
from lazyd.estargz.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOC_TAR_NAME,
    Chunk,
    Payload,
    TOCEntry,
    decode_toc_member,
    parse_payload,
)
from lazyd.estargz.names import normalize_name
from lazyd.estargz.verify import VerifyReport, verify_blob
from lazyd.estargz.writer import BuildOptions, BuildResult, build
__all__ = [
    "FOOTER_SIZE", "LEGACY_FOOTER_SIZE", "NO_PREFETCH_LANDMARK", "PREFETCH_LANDMARK", "TOC", "TOC_TAR_NAME",
    "BuildError", "Chunk", "ChunkDigestMismatch", "EStargzError", "Footer", "FooterError", "NotARegularFileError",
    "Payload", "RangeSource", "Reader", "TOCDigestMismatch", "TOCEntry", "TOCError", "TruncatedBlobError",
    "UnsafePathError", "decode_chunk", "decode_toc_member", "file_source", "footer_bytes", "normalize_name",
    "open_file", "parse_footer", "parse_payload", "read_footer", "BuildOptions", "BuildResult", "build",
    "VerifyReport", "verify_blob",
]

