-- Before the routines are created again: drop every routine of schema imgsim, so that a
-- routine whose parameters changed does not stay behind as a second overload.
DO $drop$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT p.oid::pg_catalog.regprocedure AS routine FROM pg_catalog.pg_proc p
           WHERE p.pronamespace = 'imgsim'::pg_catalog.regnamespace
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                             WHERE d.objid = p.oid AND d.deptype = 'e')
  LOOP
    EXECUTE pg_catalog.format('DROP ROUTINE %s', r.routine);
  END LOOP;
END
$drop$;
