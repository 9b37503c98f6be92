# llm-mux in a container: the reproducible zipapp on python slim, run as a non-root user.
#   docker build -t llm-mux .
#   docker run -p 8317:8317 -e LLM_MUX_API_KEYS=sk-choose-one -v llm-mux-config:/config -v llm-mux-data:/data llm-mux
FROM python:3.12-slim AS build
WORKDIR /src
COPY llm_mux.py ./
COPY tools/build_zipapp.py ./tools/
RUN python tools/build_zipapp.py --output /src/llm_mux.pyz

FROM python:3.12-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home llmmux \
 && mkdir -p /config /data/auth && chown -R llmmux:llmmux /config /data && chmod 700 /config /data /data/auth
COPY --from=build /src/llm_mux.pyz /app/llm_mux.pyz
USER llmmux
# Config by environment: the config file is created on first start in /config/llm-mux (the management key is
# printed once in the log); credentials live in /data/auth, usage.db and logs in /data. Binding 0.0.0.0 needs
# LLM_MUX_API_KEYS.
ENV HOME=/data \
    XDG_CONFIG_HOME=/config \
    LLM_MUX_AUTH_DIR=/data/auth \
    LLM_MUX_HOST=0.0.0.0 \
    LLM_MUX_PORT=8317 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/config", "/data", "/data/auth"]
EXPOSE 8317
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-I", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8317/health', timeout=4)"]
CMD ["python", "-I", "/app/llm_mux.pyz", "serve"]
