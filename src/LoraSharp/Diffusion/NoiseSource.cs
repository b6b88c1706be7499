using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>Where a sampler gets Gaussian noise: the initial latents and the noise of stochastic samplers.</summary>
public interface INoiseSource
{
    /// <summary>A standard normal tensor of the given shape.</summary>
    Tensor Next(long[] shape, ScalarType dtype, Device device);
}

/// <summary>
/// Seeded noise from a torch <see cref="Generator"/>, drawn on the generator's device (CPU by default, as diffusers
/// does for a CPU generator) and moved to the requested device: the same seed gives the same latents on any device,
/// and on CPU the same numbers as PyTorch's <c>torch.Generator().manual_seed(seed)</c>.
/// </summary>
public sealed class GeneratorNoise : INoiseSource, IDisposable
{
    readonly Generator _generator;
    readonly Device _generatorDevice;

    public long Seed { get; }

    public GeneratorNoise(long seed, Device? generatorDevice = null)
    {
        Seed = seed;
        _generatorDevice = generatorDevice ?? CPU;
        _generator = new Generator((ulong)seed, _generatorDevice);
    }

    public Tensor Next(long[] shape, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        var noise = randn(shape, dtype: dtype, device: _generatorDevice, generator: _generator);
        return noise.to(device).MoveToOuterDisposeScope();
    }

    public void Dispose() => _generator.Dispose();
}

/// <summary>Replays given noise tensors in order (tests, or noise recorded from another tool).</summary>
public sealed class RecordedNoise : INoiseSource
{
    readonly IReadOnlyList<Tensor> _noise;
    int _next;

    public RecordedNoise(IReadOnlyList<Tensor> noise) => _noise = noise;

    public Tensor Next(long[] shape, ScalarType dtype, Device device)
    {
        if (_next >= _noise.Count)
            throw new InvalidOperationException($"recorded noise exhausted after {_noise.Count} tensors");
        var t = _noise[_next++];
        if (!t.shape.SequenceEqual(shape))
            throw new InvalidOperationException($"recorded noise {_next - 1} has shape [{string.Join(", ", t.shape)}], expected [{string.Join(", ", shape)}]");
        return t.to(dtype, device).clone();
    }
}
