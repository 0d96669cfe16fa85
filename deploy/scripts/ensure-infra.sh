#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on localhost, starting the locally installed
# servers when they are stopped. Used by `make test` and `make run`; idempotent.
set -uo pipefail

wait_for() { # name, command, seconds
  local name=$1 cmd=$2 secs=$3
  for _ in $(seq 1 "$secs"); do
    if eval "$cmd" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "ensure-infra: $name did not come up within ${secs}s" >&2
  return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# No local servers installed but a Docker engine available: bring up the infrastructure from compose.
if ! command -v pg_ctlcluster >/dev/null && ! command -v redis-server >/dev/null && docker info >/dev/null 2>&1; then
  if ! port_open 5432 || ! port_open 6379 || ! port_open 5672; then
    echo "ensure-infra: starting PostgreSQL, Redis and RabbitMQ with docker compose"
    docker compose up -d --wait postgres redis rabbitmq || exit 1
  fi
fi

if ! port_open 5432; then
  echo "ensure-infra: starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  wait_for PostgreSQL "port_open 5432" 60 || exit 1
fi

if ! port_open 6379; then
  echo "ensure-infra: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  wait_for Redis "port_open 6379" 30 || exit 1
fi

if ! port_open 5672; then
  echo "ensure-infra: starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for RabbitMQ "port_open 5672" 120 || exit 1
fi
# The AMQP port opens a little before the broker accepts logins; give it a moment.
wait_for "RabbitMQ login" "rabbitmqctl -q status" 60 || true
# Dead letters at least once also for queues declared before the services asked for it (a queue's
# arguments cannot change; a policy can). The same policy as deploy/rabbitmq/definitions.json; idempotent.
if command -v rabbitmqctl >/dev/null; then
  rabbitmqctl -q set_policy --apply-to queues credit-proxy-dead-letters-at-least-once \
    '^(credits\.billing-events|ai\.requests)(\..+)?$' \
    '{"dead-letter-strategy":"at-least-once","overflow":"reject-publish"}' >/dev/null 2>&1 || true
fi
echo "ensure-infra: PostgreSQL, Redis and RabbitMQ are up"
