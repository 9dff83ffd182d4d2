-- imgsim in PostgreSQL: one routine per template step, each a few lines calling the package.
-- Installed by `imgsim deploy`, which fills in {site}: the site-packages of the server-side
-- environment, pinned (SET) on every routine that imports from it, so that no session can
-- point the server at other code; and {search_path}: pg_catalog, imgsim, the schema of
-- pgvector where it is elsewhere, pg_temp.
--
-- How a procedure runs: imgsim.<step>(...) (PL/pgSQL, the caller's rights) packs its
-- arguments and CALLs imgsim._call, which runs the step in imgsim._run (the owner's rights:
-- SECURITY DEFINER, pinned settings) inside a subtransaction. On an error the step's writes
-- are rolled back, a failed row is added to imgsim.runs and committed (when the CALL is not
-- inside the caller's own transaction block), and the error is raised to the caller.

-- Runs one step with the owner's rights; returns its result as JSON.
CREATE OR REPLACE FUNCTION imgsim._run(step text, arguments jsonb) RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = {search_path}
SET imgsim.site = {site}
AS $imgsim$
import json
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
return json.dumps(call(plpy, step, **json.loads(arguments)), default=str)
$imgsim$;

-- Records a step that failed (its own rows were rolled back with it).
CREATE OR REPLACE FUNCTION imgsim._record_failure(step text, arguments jsonb, error text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = {search_path}
AS $imgsim$
INSERT INTO imgsim.runs (step, parameters, started, finished, status, counts, error)
VALUES (step, arguments::json, now(), clock_timestamp(), 'failed', json_build_object(), error);
$imgsim$;

-- Runs a step as one subtransaction; on failure records it, commits that record when the
-- caller allows it, and raises the error again.
CREATE OR REPLACE PROCEDURE imgsim._call(step text, arguments jsonb)
LANGUAGE plpython3u
AS $imgsim$
try:
    with plpy.subtransaction():
        plpy.execute(plpy.prepare("SELECT imgsim._run($1, $2)", ["text", "jsonb"]),
                     [step, arguments])
except plpy.SPIError as error:
    plpy.execute(plpy.prepare("SELECT imgsim._record_failure($1, $2, $3)",
                              ["text", "jsonb", "text"]), [step, arguments, error.args[0]])
    try:
        plpy.commit()
    except plpy.SPIError:
        pass  # CALLed inside the caller's transaction block: that transaction decides
    message = error.args[0]
    if message.startswith("spiexceptions."):  # already named by its class once
        message = message.split(": ", 1)[-1]
    raise type(error)(message)
$imgsim$;

-- Load a server folder (one sub-folder per category) into imgsim.images: new and changed files only.
CREATE OR REPLACE PROCEDURE imgsim.sync_image_folder(folder text)
LANGUAGE plpgsql AS $imgsim$
BEGIN
  CALL imgsim._call('sync_image_folder', jsonb_build_object('folder', folder));
END
$imgsim$;

-- CNN features of every image that has none for the backbone.
CREATE OR REPLACE PROCEDURE imgsim.featurize_images(backbone text DEFAULT 'efficientnet_lite0', batch_size int DEFAULT 32, weights text DEFAULT NULL)
LANGUAGE plpgsql AS $imgsim$
BEGIN
  CALL imgsim._call('featurize_images', jsonb_build_object('backbone', backbone, 'batch_size', batch_size, 'weights', weights));
END
$imgsim$;

-- Train/test split per category and the evaluation pairs, from the featurized images.
CREATE OR REPLACE PROCEDURE imgsim.prepare_data(ratio_train_test float8 DEFAULT 0.75, max_query_imgs_per_subdir int DEFAULT 20, max_neg_imgs_per_query_img int DEFAULT 100, seed int DEFAULT 42, backbone text DEFAULT 'efficientnet_lite0', weights text DEFAULT NULL)
LANGUAGE plpgsql AS $imgsim$
BEGIN
  CALL imgsim._call('prepare_data', jsonb_build_object('ratio_train_test', ratio_train_test, 'max_query_imgs_per_subdir', max_query_imgs_per_subdir, 'max_neg_imgs_per_query_img', max_neg_imgs_per_query_img, 'seed', seed, 'backbone', backbone, 'weights', weights));
END
$imgsim$;

-- Train the classifier (stored as ONNX in imgsim.models) and score every image.
CREATE OR REPLACE PROCEDURE imgsim.train_classifier(kind text DEFAULT 'mlp', seed int DEFAULT 42, backbone text DEFAULT 'efficientnet_lite0', weights text DEFAULT NULL)
LANGUAGE plpgsql AS $imgsim$
BEGIN
  CALL imgsim._call('train_classifier', jsonb_build_object('kind', kind, 'seed', seed, 'backbone', backbone, 'weights', weights));
END
$imgsim$;

-- The top_k_candidates most similar images of each query image, into imgsim.ranking_results.
CREATE OR REPLACE PROCEDURE imgsim.rank_candidates(top_k_candidates int DEFAULT 10, space text DEFAULT 'scores', include_self boolean DEFAULT false, query_table text DEFAULT 'query_images', backbone text DEFAULT NULL, weights text DEFAULT NULL)
LANGUAGE plpgsql AS $imgsim$
BEGIN
  CALL imgsim._call('rank_candidates', jsonb_build_object('top_k_candidates', top_k_candidates, 'space', space, 'include_self', include_self, 'query_table', query_table, 'backbone', backbone, 'weights', weights));
END
$imgsim$;

-- Every step: [sync], featurize, prepare, train, evaluate, rank.
CREATE OR REPLACE PROCEDURE imgsim.run_image_similarity(image_folder text DEFAULT NULL, backbone text DEFAULT 'efficientnet_lite0', ratio_train_test float8 DEFAULT 0.75, max_query_imgs_per_subdir int DEFAULT 20, max_neg_imgs_per_query_img int DEFAULT 100, top_k_candidates int DEFAULT 10, ks int[] DEFAULT ARRAY[1,2,4,5,8,10,15,20,28,32], kind text DEFAULT 'mlp', space text DEFAULT 'scores', seed int DEFAULT 42, weights text DEFAULT NULL)
LANGUAGE plpgsql AS $imgsim$
BEGIN
  CALL imgsim._call('run_image_similarity', jsonb_build_object('image_folder', image_folder, 'backbone', backbone, 'ratio_train_test', ratio_train_test, 'max_query_imgs_per_subdir', max_query_imgs_per_subdir, 'max_neg_imgs_per_query_img', max_neg_imgs_per_query_img, 'top_k_candidates', top_k_candidates, 'ks', ks, 'kind', kind, 'space', space, 'seed', seed, 'weights', weights));
END
$imgsim$;

-- The scheduled job: featurize new images, re-score them with the current classifier, rank again.
CREATE OR REPLACE PROCEDURE imgsim.refresh(top_k_candidates int DEFAULT 10, space text DEFAULT 'scores')
LANGUAGE plpgsql AS $imgsim$
BEGIN
  CALL imgsim._call('refresh', jsonb_build_object('top_k_candidates', top_k_candidates, 'space', space));
END
$imgsim$;

-- Top-k ranking accuracy by L2 and cosine distance; stored in imgsim.ranking_metrics and returned.
CREATE OR REPLACE FUNCTION imgsim.evaluate_model(ks int[] DEFAULT ARRAY[1,2,4,5,8,10,15,20,28,32], space text DEFAULT 'scores', backbone text DEFAULT NULL, weights text DEFAULT NULL)
RETURNS TABLE(distance text, k int, accuracy float8, mean_rank float8, median_rank float8)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = {search_path}
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
return call(plpy, "evaluate_model", ks=ks, space=space, backbone=backbone, weights=weights)
$imgsim$;

-- Featurize and score one new image, and return the k most similar stored images.
CREATE OR REPLACE FUNCTION imgsim.similar_images(image bytea, k int DEFAULT 10, space text DEFAULT 'scores')
RETURNS TABLE(image_id int, path text, category text, distance float8)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = {search_path}
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
return call(plpy, "similar_images", image=image, k=k, space=space)
$imgsim$;
