# smtpproxy in a container: Debian slim, the proxy in a venv, run as a non-root user on
# the config `smtpproxy init` writes. Mount your own /etc/smtpproxy to configure it.
#   docker build -t smtpproxy .
#   docker run -p 25:2525 -v /srv/smtpproxy/etc:/etc/smtpproxy:ro smtpproxy
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10025 --home-dir /var/lib/smtpproxy --create-home \
        --shell /usr/sbin/nologin smtpproxy
COPY --from=build /wheels /wheels
RUN python -m venv /opt/smtpproxy \
    && /opt/smtpproxy/bin/pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels
# The packaged config and rules; inside a container the ports must face the network.
RUN /opt/smtpproxy/bin/smtpproxy init /etc/smtpproxy \
    && printf 'listen: "0.0.0.0:2525"\nmetrics: "0.0.0.0:9125"\n' >> /etc/smtpproxy/smtpproxy.yaml \
    && /opt/smtpproxy/bin/smtpproxy config --config /etc/smtpproxy/smtpproxy.yaml >/dev/null
USER smtpproxy
WORKDIR /var/lib/smtpproxy
VOLUME ["/var/lib/smtpproxy"]
EXPOSE 2525 9125
STOPSIGNAL SIGTERM
CMD ["/opt/smtpproxy/bin/smtpproxy", "serve", "--config", "/etc/smtpproxy/smtpproxy.yaml"]
