namespace LoraSharp.Tests.Adapters;

/// <summary>
/// Adapter tests that must not run beside others: process RSS measurements and tests that replay torch's global
/// random generator (manual_seed, then expect the same draws inside the adapter).
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class SerialAdapterTests
{
    public const string Name = "Adapters (serial)";
}
