"""Real Postgres, Redis and S3 for the tests: testcontainers when Docker answers, else embedded.

Either way the servers are genuine and reached over TCP; nothing here is a stand-in.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from devstack.servers import start_postgres, start_redis, start_s3, stop_server
from devstack.stack import REPO_ROOT
from shared.config import Settings
from shared.storage import ObjectStore

TEMPLATE_DB = "screening_template"
S3_ACCESS_KEY = "test-access"
S3_SECRET_KEY = "test-secret-key"


@dataclass(frozen=True)
class Infra:
    postgres_admin_url: str  # libpq URL of the server's maintenance database
    postgres_host_port: str
    redis_url_base: str  # without a db number
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    kind: str  # "testcontainers" or "embedded"


def docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # no engine, no socket, no permission: all mean "not reachable"
        return False
    return True


@contextlib.contextmanager
def containers() -> Iterator[Infra]:
    from testcontainers.minio import MinioContainer
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    with (
        PostgresContainer("postgres:16-alpine", driver=None) as pg,
        RedisContainer("redis:7-alpine") as rd,
        MinioContainer(access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY) as s3,
    ):
        host_port = f"{pg.get_container_host_ip()}:{pg.get_exposed_port(5432)}"
        yield Infra(
            postgres_admin_url=f"postgresql://{pg.username}:{pg.password}@{host_port}/postgres",
            postgres_host_port=f"{pg.username}:{pg.password}@{host_port}",
            redis_url_base=f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}",
            s3_endpoint=f"http://{s3.get_container_host_ip()}:{s3.get_exposed_port(9000)}",
            s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=S3_SECRET_KEY,
            kind="testcontainers",
        )


@contextlib.contextmanager
def embedded(data_dir: Path) -> Iterator[Infra]:
    servers = []
    try:
        servers.append(start_postgres(data_dir / "postgres", database="postgres"))
        servers.append(start_redis(data_dir / "redis"))
        servers.append(
            start_s3(data_dir / "s3", access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
        )
        pg, rd, s3 = servers
        host_port = pg.url.split("@", 1)[1].split("/", 1)[0]
        yield Infra(
            postgres_admin_url=f"postgresql://postgres@{host_port}/postgres",
            postgres_host_port=f"postgres@{host_port}",
            redis_url_base=rd.url.rsplit("/", 1)[0],
            s3_endpoint=s3.url,
            s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=S3_SECRET_KEY,
            kind="embedded",
        )
    finally:
        for server in reversed(servers):
            stop_server(server)


def migrate_template(infra: Infra) -> None:
    """Create the template database once and migrate it to head with Alembic."""
    from alembic import command
    from alembic.config import Config

    with psycopg.connect(infra.postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", database_url(infra, TEMPLATE_DB))
    command.upgrade(config, "head")


def database_url(infra: Infra, name: str) -> str:
    return f"postgresql+psycopg://{infra.postgres_host_port}/{name}"


_counter = itertools.count()


def fresh_settings(infra: Infra, *, migrated: bool = True) -> Settings:
    """Settings on a new database (a copy of the migrated template), bucket and Redis db."""
    n = next(_counter)
    db_name = f"test_{n}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(infra.postgres_admin_url, autocommit=True) as conn:
        template = f' TEMPLATE "{TEMPLATE_DB}"' if migrated else ""
        conn.execute(f'CREATE DATABASE "{db_name}"{template}')
    # Databases 1-15 rotate between tests; 0 is left alone. Each test starts it empty.
    redis_url = f"{infra.redis_url_base}/{1 + n % 15}"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    settings = Settings(
        env="test",
        database_url=database_url(infra, db_name),
        redis_url=redis_url,
        s3_endpoint=infra.s3_endpoint,
        s3_access_key=infra.s3_access_key,
        s3_secret_key=infra.s3_secret_key,
        s3_bucket=f"test-{n}-{uuid.uuid4().hex[:8]}",
    )
    ObjectStore(settings).ensure_bucket()
    return settings


def drop_bucket(settings: Settings) -> None:
    """Empty and remove a test's bucket. SeaweedFS gives every bucket its own volumes (a
    collection) out of a server-wide count, so buckets left behind would run a long session
    out of volumes and into 500s."""
    store = ObjectStore(settings)
    client = store.client
    if not client.bucket_exists(store.bucket):
        return
    for item in client.list_objects(store.bucket, recursive=True):
        client.remove_object(store.bucket, str(item.object_name))
    client.remove_bucket(store.bucket)
