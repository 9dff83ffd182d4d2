-- imgsim roles and rights, applied by `imgsim deploy` after the tables and routines.
-- The role names come from the session settings imgsim.admin_role and imgsim.analyst_role
-- (set by deploy with bound parameters) and are quoted with format('%I').
-- The admin role owns the schema, its tables and routines. The analyst role may run the
-- routines and read every table, and choose query images; it cannot change code, models
-- or settings.
DO $roles$
DECLARE
  admin text := current_setting('imgsim.admin_role');
  analyst text := current_setting('imgsim.analyst_role');
  r record;
BEGIN
  EXECUTE format('ALTER SCHEMA imgsim OWNER TO %I', admin);
  FOR r IN SELECT c.oid::regclass AS rel FROM pg_class c
           WHERE c.relnamespace = 'imgsim'::regnamespace AND c.relkind = 'r'
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('ALTER TABLE %s OWNER TO %I', r.rel, admin);
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS routine FROM pg_proc p
           WHERE p.pronamespace = 'imgsim'::regnamespace
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.routine, admin);
    EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', r.routine);
    EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', r.routine, analyst);
  END LOOP;
  EXECUTE format('REVOKE CREATE ON SCHEMA imgsim FROM PUBLIC');
  EXECUTE format('GRANT USAGE ON SCHEMA imgsim TO %I', analyst);
  EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA imgsim TO %I', analyst);
  EXECUTE format('GRANT INSERT, DELETE ON imgsim.query_images TO %I', analyst);
END
$roles$;
