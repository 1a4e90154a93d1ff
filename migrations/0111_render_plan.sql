-- The typed render plan (nirvana/service/plan.py) and model keys that carry scheduler settings.
--
-- jobs.capture_steps: the steps the render worker captures, chosen by the router from the cache's K policy
-- (``KPolicy.cached_steps``, the function the lookup uses), so every stored state is one a lookup can ask for.
-- NULL (jobs routed before this migration): the render side asks the policy itself.
ALTER TABLE jobs ADD COLUMN capture_steps integer[];

-- served_models.scheduler_config: the scheduler settings in the model key (spacing, karras sigmas, shift).
ALTER TABLE served_models ADD COLUMN scheduler_config text NOT NULL DEFAULT '';
