-- Before the routines are created again: drop every routine of schema imgsim, so that a
-- routine whose parameters changed does not stay behind as a second overload, then the
-- domains of their parameters.
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
  FOR r IN SELECT t.oid::pg_catalog.regtype AS domain FROM pg_catalog.pg_type t
           WHERE t.typnamespace = 'imgsim'::pg_catalog.regnamespace AND t.typtype = 'd'
  LOOP
    EXECUTE pg_catalog.format('DROP DOMAIN %s', r.domain);
  END LOOP;
END
$drop$;
