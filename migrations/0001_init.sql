-- 0001_init.sql - the initial strata schema: users and tokens, workers, jobs
-- and their dependencies, artifacts, job logs and metrics.

CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    role        text NOT NULL CHECK (role IN ('admin', 'user', 'worker')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only the SHA-256 of a token is stored; the token itself is shown once.
CREATE TABLE tokens (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sha256      text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workers (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL,
    hostname      text NOT NULL DEFAULT '',
    gpus          jsonb NOT NULL DEFAULT '[]',
    queues        jsonb NOT NULL DEFAULT '[]',
    user_id       bigint NOT NULL REFERENCES users (id),
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL,
    name             text,
    state            text NOT NULL CHECK (state IN ('blocked', 'queued', 'running',
                                                    'succeeded', 'failed', 'cancelled')),
    spec             jsonb NOT NULL,
    priority         integer NOT NULL DEFAULT 0,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3,
    resources        jsonb NOT NULL DEFAULT '{"gpus": 0}',
    progress         jsonb,
    result           jsonb,
    error            text,
    owner_id         bigint NOT NULL REFERENCES users (id),
    worker_id        bigint REFERENCES workers (id),
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    not_before       timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

-- The claim scans queued jobs in priority order.
CREATE INDEX jobs_claim_idx ON jobs (state, priority DESC, created_at) WHERE state = 'queued';
-- The reaper looks for running jobs whose lease lapsed; fairness counts an
-- owner's running jobs.
CREATE INDEX jobs_running_idx ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_owner_running_idx ON jobs (owner_id) WHERE state = 'running';
CREATE INDEX jobs_state_idx ON jobs (state, id);

CREATE TABLE job_deps (
    job_id     bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    depends_on bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, depends_on)
);
CREATE INDEX job_deps_depends_on_idx ON job_deps (depends_on);

CREATE TABLE artifacts (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('npy', 'file')),
    size        bigint NOT NULL CHECK (size >= 0),
    sha256      text NOT NULL,
    job_id      bigint REFERENCES jobs (id) ON DELETE CASCADE,
    meta        jsonb NOT NULL DEFAULT '{}',
    owner_id    bigint NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- A job's artifact names are unique: a retried attempt's upload replaces the
-- earlier one.
CREATE UNIQUE INDEX artifacts_job_name_idx ON artifacts (job_id, name) WHERE job_id IS NOT NULL;

CREATE TABLE job_logs (
    id          bigserial PRIMARY KEY,
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    line        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_logs_job_idx ON job_logs (job_id, id);

CREATE TABLE job_metrics (
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name        text NOT NULL,
    step        bigint NOT NULL,
    value       double precision NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_metrics_job_idx ON job_metrics (job_id, name, step);

-- RFC 3339 UTC with microseconds, as every API time is written.
CREATE FUNCTION strata_time(t timestamptz) RETURNS text
    LANGUAGE sql STABLE AS
$$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') $$;

-- The API's job object, built in one place so that every statement that
-- returns a job (insert, claim, cancel, ...) returns the same shape.
CREATE FUNCTION strata_job_doc(j jobs) RETURNS json
    LANGUAGE sql STABLE AS
$$
SELECT json_build_object(
    'id', j.id,
    'kind', j.kind,
    'name', j.name,
    'state', j.state,
    'spec', j.spec,
    'priority', j.priority,
    'attempt', j.attempt,
    'max_attempts', j.max_attempts,
    'depends_on', COALESCE((SELECT json_agg(d.depends_on ORDER BY d.depends_on)
                              FROM job_deps d WHERE d.job_id = j.id), '[]'::json),
    'resources', j.resources,
    'progress', j.progress,
    'result', j.result,
    'error', j.error,
    'owner', (SELECT u.name FROM users u WHERE u.id = j.owner_id),
    'worker', j.worker_id,
    'created_at', strata_time(j.created_at),
    'started_at', strata_time(j.started_at),
    'finished_at', strata_time(j.finished_at),
    'lease_expires_at', strata_time(j.lease_expires_at),
    'cancel_requested', j.cancel_requested)
$$;

CREATE FUNCTION strata_artifact_doc(a artifacts) RETURNS json
    LANGUAGE sql STABLE AS
$$
SELECT json_build_object(
    'id', a.id,
    'name', a.name,
    'kind', a.kind,
    'size', a.size,
    'sha256', a.sha256,
    'job', a.job_id,
    'meta', a.meta,
    'created_at', strata_time(a.created_at))
$$;
