-- pgvector: features also kept as a vector column, with HNSW indexes (cosine) for the
-- backbones' dimensions: 1280 (efficientnet_lite0, mobilenet_v2) and 512 (resnet18), and
-- for the colour layouts' 768 (near copies in the combined space).
-- Applied by `imgsim deploy` where the server has pgvector, with {vector} the schema
-- pgvector lives in (every name of pgvector is qualified with it); without pgvector,
-- ranking and similar_images search exactly (same results, linear time).
ALTER TABLE imgsim.features ADD COLUMN IF NOT EXISTS embedding {vector}.vector;
CREATE INDEX IF NOT EXISTS features_embedding_1280 ON imgsim.features
  USING hnsw ((embedding::{vector}.vector(1280)) {vector}.vector_cosine_ops)
  WHERE {vector}.vector_dims(embedding) = 1280;
CREATE INDEX IF NOT EXISTS features_embedding_512 ON imgsim.features
  USING hnsw ((embedding::{vector}.vector(512)) {vector}.vector_cosine_ops)
  WHERE {vector}.vector_dims(embedding) = 512;
CREATE INDEX IF NOT EXISTS features_embedding_768 ON imgsim.features
  USING hnsw ((embedding::{vector}.vector(768)) {vector}.vector_cosine_ops)
  WHERE {vector}.vector_dims(embedding) = 768;
