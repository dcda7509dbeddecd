-- 0002_models_datasets.sql - models and datasets registered with the server,
-- so that predict (and later train) jobs can name them by id.
--
-- A model or dataset is either a path on a filesystem the workers share, or
-- uploaded artifacts. Names are unique per kind: a model and a dataset may
-- share one.

-- A model is a folder in Hugging Face layout ("hf": config.json, safetensors,
-- tokenizer.json) or one llama2c checkpoint ("llama2c": a .bin file). It is
-- given by path, by one uploaded file (llama2c: artifact_id) or by uploaded
-- files under their names in the folder (hf: model_files).
CREATE TABLE models (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    format      text NOT NULL CHECK (format IN ('hf', 'llama2c')),
    path        text CHECK (path IS NULL OR left(path, 1) = '/'),
    artifact_id bigint REFERENCES artifacts (id),
    owner_id    bigint NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (path IS NULL OR artifact_id IS NULL),
    CHECK (artifact_id IS NULL OR format = 'llama2c')
);

-- The uploaded files of an hf model: each file name in the model's folder
-- and the artifact that holds it. Artifacts a model uses cannot be deleted
-- from under it (no ON DELETE on artifact_id).
CREATE TABLE model_files (
    model_id    bigint NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    name        text NOT NULL,
    artifact_id bigint NOT NULL REFERENCES artifacts (id),
    PRIMARY KEY (model_id, name)
);

-- A dataset in LLaMA-Factory's alpaca JSON or Flan's JSONL layout, by path
-- or as one uploaded artifact. dataset_info is the dataset's entry of a
-- LLaMA-Factory dataset_info.json (column names), for alpaca only.
CREATE TABLE datasets (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    format       text NOT NULL CHECK (format IN ('alpaca', 'flan')),
    path         text CHECK (path IS NULL OR left(path, 1) = '/'),
    artifact_id  bigint REFERENCES artifacts (id),
    dataset_info jsonb CHECK (dataset_info IS NULL OR jsonb_typeof(dataset_info) = 'object'),
    owner_id     bigint NOT NULL REFERENCES users (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((path IS NULL) <> (artifact_id IS NULL)),
    CHECK (dataset_info IS NULL OR format = 'alpaca')
);

-- The API's model object: "path", "files" or "file", whichever it has.
-- json_strip_nulls is safe here: no value below the top level can be null.
CREATE FUNCTION strata_model_doc(m models) RETURNS json
    LANGUAGE sql STABLE AS
$$
SELECT json_strip_nulls(json_build_object(
    'id', m.id,
    'name', m.name,
    'format', m.format,
    'path', m.path,
    'files', (SELECT json_object_agg(f.name, f.artifact_id ORDER BY f.name)
                FROM model_files f WHERE f.model_id = m.id),
    'file', m.artifact_id,
    'owner', (SELECT u.name FROM users u WHERE u.id = m.owner_id),
    'created_at', strata_time(m.created_at)))
$$;

-- The API's dataset object: "path" or "artifact", whichever it has (the
-- user's dataset_info is returned as stored, nulls included).
CREATE FUNCTION strata_dataset_doc(d datasets) RETURNS json
    LANGUAGE sql STABLE AS
$$
SELECT CASE WHEN d.path IS NOT NULL THEN
    json_build_object(
        'id', d.id,
        'name', d.name,
        'format', d.format,
        'path', d.path,
        'dataset_info', d.dataset_info,
        'owner', (SELECT u.name FROM users u WHERE u.id = d.owner_id),
        'created_at', strata_time(d.created_at))
ELSE
    json_build_object(
        'id', d.id,
        'name', d.name,
        'format', d.format,
        'artifact', d.artifact_id,
        'dataset_info', d.dataset_info,
        'owner', (SELECT u.name FROM users u WHERE u.id = d.owner_id),
        'created_at', strata_time(d.created_at))
END
$$;
