namespace LoraSharp.Tests.Training.LlmTraining;

/// <summary>
/// Tests that depend on libtorch's process-wide state — the global random generator (dropout) and the thread count
/// (float summation order) — e.g. bit-exact resume. They run alone, after the parallel tests, so no other test
/// reseeds the generator or changes the thread count underneath them.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class TorchGlobalStateCollection
{
    public const string Name = "libtorch global state";
}
