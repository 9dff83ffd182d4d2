-- imgsim stored procedures: one per template step, each a few lines calling the package.
-- Installed by `imgsim deploy`, which fills in {site}: the server-side environment's
-- site-packages, pinned on every routine (SET), so no session can point it elsewhere.
-- The routines run as their owner (SECURITY DEFINER) with a pinned search_path.

-- Load a server folder (one sub-folder per category) into imgsim.images: new and changed files only.
CREATE OR REPLACE PROCEDURE imgsim.sync_image_folder(folder text)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
call(plpy, "sync_image_folder", True, folder=folder)
$imgsim$;

-- CNN features of every image that has none for the backbone.
CREATE OR REPLACE PROCEDURE imgsim.featurize_images(backbone text DEFAULT 'efficientnet_lite0', batch_size int DEFAULT 32, weights text DEFAULT NULL)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
call(plpy, "featurize_images", True, backbone=backbone, batch_size=batch_size, weights=weights)
$imgsim$;

-- Train/test split per category and the evaluation pairs, from the featurized images.
CREATE OR REPLACE PROCEDURE imgsim.prepare_data(ratio_train_test float8 DEFAULT 0.75, max_query_imgs_per_subdir int DEFAULT 20, max_neg_imgs_per_query_img int DEFAULT 100, seed int DEFAULT 42, backbone text DEFAULT 'efficientnet_lite0', weights text DEFAULT NULL)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
call(plpy, "prepare_data", True, ratio_train_test=ratio_train_test, max_query_imgs_per_subdir=max_query_imgs_per_subdir, max_neg_imgs_per_query_img=max_neg_imgs_per_query_img, seed=seed, backbone=backbone, weights=weights)
$imgsim$;

-- Train the classifier (stored as ONNX in imgsim.models) and score every image.
CREATE OR REPLACE PROCEDURE imgsim.train_classifier(kind text DEFAULT 'mlp', seed int DEFAULT 42, backbone text DEFAULT 'efficientnet_lite0', weights text DEFAULT NULL)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
call(plpy, "train_classifier", True, kind=kind, seed=seed, backbone=backbone, weights=weights)
$imgsim$;

-- Top-k ranking accuracy by L2 and cosine distance; stored in imgsim.ranking_metrics and returned.
CREATE OR REPLACE FUNCTION imgsim.evaluate_model(ks int[] DEFAULT ARRAY[1,2,4,5,8,10,15,20,28,32], space text DEFAULT 'scores', backbone text DEFAULT 'efficientnet_lite0', weights text DEFAULT NULL)
RETURNS TABLE(distance text, k int, accuracy float8, mean_rank float8, median_rank float8)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
return call(plpy, "evaluate_model", False, ks=ks, space=space, backbone=backbone, weights=weights)
$imgsim$;

-- The top_k_candidates most similar images of each query image, into imgsim.ranking_results.
CREATE OR REPLACE PROCEDURE imgsim.rank_candidates(top_k_candidates int DEFAULT 10, space text DEFAULT 'scores', include_self boolean DEFAULT false, query_table text DEFAULT 'query_images', backbone text DEFAULT 'efficientnet_lite0', weights text DEFAULT NULL)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
call(plpy, "rank_candidates", True, top_k_candidates=top_k_candidates, space=space, include_self=include_self, query_table=query_table, backbone=backbone, weights=weights)
$imgsim$;

-- Every step: [sync], featurize, prepare, train, evaluate, rank.
CREATE OR REPLACE PROCEDURE imgsim.run_image_similarity(image_folder text DEFAULT NULL, backbone text DEFAULT 'efficientnet_lite0', ratio_train_test float8 DEFAULT 0.75, max_query_imgs_per_subdir int DEFAULT 20, max_neg_imgs_per_query_img int DEFAULT 100, top_k_candidates int DEFAULT 10, kind text DEFAULT 'mlp', space text DEFAULT 'scores', seed int DEFAULT 42, weights text DEFAULT NULL)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
call(plpy, "run_image_similarity", True, image_folder=image_folder, backbone=backbone, ratio_train_test=ratio_train_test, max_query_imgs_per_subdir=max_query_imgs_per_subdir, max_neg_imgs_per_query_img=max_neg_imgs_per_query_img, top_k_candidates=top_k_candidates, kind=kind, space=space, seed=seed, weights=weights)
$imgsim$;

-- Featurize and score one new image, and return the k most similar stored images.
CREATE OR REPLACE FUNCTION imgsim.similar_images(image bytea, k int DEFAULT 10, space text DEFAULT 'scores')
RETURNS TABLE(image_id int, path text, category text, distance float8)
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
return call(plpy, "similar_images", False, image=image, k=k, space=space)
$imgsim$;

-- The scheduled job: featurize new images, re-score them with the current classifier, rank again.
CREATE OR REPLACE PROCEDURE imgsim.refresh(top_k_candidates int DEFAULT 10, space text DEFAULT 'scores')
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, imgsim, pg_temp
SET imgsim.site = {site}
AS $imgsim$
import site
site.addsitedir(plpy.execute("SELECT current_setting('imgsim.site') AS s")[0]["s"])
from imgsim.indb import call
call(plpy, "refresh", True, top_k_candidates=top_k_candidates, space=space)
$imgsim$;
