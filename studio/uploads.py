"""Upload handling: stream to a temporary file on disk and stop reading as soon as the size limit is
passed, so an oversized upload never fills the disk or memory."""

from __future__ import annotations

from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler


class LimitedTemporaryFileUploadHandler(TemporaryFileUploadHandler):
    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        # Content-Length includes the multipart framing; a little over the limit is allowed for it.
        # StopUpload may only be raised while the parser reads a file (raised here it escapes as a
        # 500): mark the request and stop at the file's first chunk. The form fields before the file
        # (the CSRF token) are still read, so the page can say why.
        self.too_large = bool(
            content_length and content_length > settings.STUDIO_UPLOAD_MAX_BYTES + 64 * 1024
        )
        if self.too_large:
            self.request.upload_too_large = True
        return None

    def receive_data_chunk(self, raw_data, start):
        if self.too_large or start + len(raw_data) > settings.STUDIO_UPLOAD_MAX_BYTES:
            self.request.upload_too_large = True
            self.file.close()
            raise StopUpload(connection_reset=True)
        return super().receive_data_chunk(raw_data, start)
