-- imgsim roles and rights, applied by `imgsim deploy` after the tables and routines;
-- {admin} and {analyst} are the role names, quoted by deploy.
--
-- The admin role owns the schema, its tables and routines. The analyst role may use the
-- schema, read every table and run the public routines (and imgsim._step, which they
-- need and which refuses any call that is not theirs: see imgsim/indb.py); it may
-- write no table directly: query images are chosen with imgsim.set_query_images.
ALTER SCHEMA imgsim OWNER TO {admin};
ALTER SCHEMA imgsim_private OWNER TO {admin};
REVOKE ALL ON SCHEMA imgsim_private FROM PUBLIC;  -- the lease table: the owner's alone
REVOKE CREATE ON SCHEMA imgsim FROM PUBLIC;
GRANT USAGE ON SCHEMA imgsim TO {analyst};
REVOKE ALL ON ALL TABLES IN SCHEMA imgsim FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA imgsim FROM {analyst};
GRANT SELECT ON ALL TABLES IN SCHEMA imgsim TO {analyst};
REVOKE ALL ON ALL SEQUENCES IN SCHEMA imgsim FROM PUBLIC;
REVOKE ALL ON ALL ROUTINES IN SCHEMA imgsim FROM PUBLIC;  -- the domains keep USAGE for all
GRANT EXECUTE ON ALL ROUTINES IN SCHEMA imgsim TO {analyst};
DO $roles$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT c.oid::pg_catalog.regclass AS rel FROM pg_catalog.pg_class c
           WHERE c.relnamespace IN ('imgsim'::pg_catalog.regnamespace,
                                    'imgsim_private'::pg_catalog.regnamespace)
             AND c.relkind IN ('r', 'S')
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                             WHERE d.objid = c.oid AND d.deptype IN ('e', 'a', 'i'))
  LOOP
    EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO %I', r.rel,
                              pg_catalog.current_setting('imgsim.admin_role'));
  END LOOP;
  FOR r IN SELECT p.oid::pg_catalog.regprocedure AS routine FROM pg_catalog.pg_proc p
           WHERE p.pronamespace = 'imgsim'::pg_catalog.regnamespace
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                             WHERE d.objid = p.oid AND d.deptype = 'e')
  LOOP
    EXECUTE pg_catalog.format('ALTER ROUTINE %s OWNER TO %I', r.routine,
                              pg_catalog.current_setting('imgsim.admin_role'));
  END LOOP;
END
$roles$;
