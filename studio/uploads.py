"""Upload handling: stream to a temporary file on disk and stop reading as soon as the size limit is
passed, so an oversized upload never fills the disk or memory."""

from __future__ import annotations

from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler


class LimitedTemporaryFileUploadHandler(TemporaryFileUploadHandler):
    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        self.too_large = False
        self.received = 0
        # Content-Length includes the multipart framing; a little over the limit is allowed for it.
        if content_length and content_length > settings.STUDIO_UPLOAD_MAX_BYTES + 64 * 1024:
            self.request.upload_too_large = True
            raise StopUpload(connection_reset=True)
        return None

    def receive_data_chunk(self, raw_data, start):
        if start + len(raw_data) > settings.STUDIO_UPLOAD_MAX_BYTES:
            self.request.upload_too_large = True
            self.file.close()
            raise StopUpload(connection_reset=True)
        return super().receive_data_chunk(raw_data, start)
