namespace LoraSharp.Models.Llama;

/// <summary>
/// Decoding settings with Hugging Face <c>generate()</c> semantics. Greedy (argmax) unless <see cref="Sample"/>;
/// when sampling, logits pass through repetition penalty → temperature → top-k → top-p, then one token is drawn
/// with a seeded <c>torch.Generator</c>.
/// </summary>
public sealed record GenerationOptions
{
    /// <summary>Tokens to produce at most (stop tokens included). Default 128.</summary>
    public int MaxNewTokens { get; init; } = 128;

    /// <summary>Draw from the distribution instead of taking the argmax. Default false (greedy).</summary>
    public bool Sample { get; init; }

    /// <summary>Logits are divided by this before sampling (must be &gt; 0). Default 1.</summary>
    public double Temperature { get; init; } = 1.0;

    /// <summary>Keep only the k most likely tokens when sampling; 0 = off. Default 0.</summary>
    public int TopK { get; init; }

    /// <summary>Keep the smallest set of most likely tokens whose probability reaches p when sampling; 1 = off. Default 1.</summary>
    public double TopP { get; init; } = 1.0;

    /// <summary>
    /// HF repetition penalty, applied to every token already in the sequence (prompt included), greedy or not:
    /// positive logits are divided by it, negative ones multiplied. 1 = off. Default 1.
    /// </summary>
    public double RepetitionPenalty { get; init; } = 1.0;

    /// <summary>Token ids that end generation (the stop token is yielded, then generation ends). Default none.</summary>
    public IReadOnlyCollection<int> StopTokens { get; init; } = [];

    /// <summary>Seed of the sampling generator; null = a random seed. Same seed, same options, same model → same tokens.</summary>
    public long? Seed { get; init; }

    /// <summary>Reuse past keys/values (one new position per step) instead of recomputing the whole sequence. Default true.</summary>
    public bool UseCache { get; init; } = true;

    internal void Validate()
    {
        if (MaxNewTokens < 0) throw new ArgumentOutOfRangeException(nameof(MaxNewTokens), MaxNewTokens, "must be ≥ 0");
        if (Sample && !(Temperature > 0)) throw new ArgumentOutOfRangeException(nameof(Temperature), Temperature, "must be > 0 when sampling");
        if (TopK < 0) throw new ArgumentOutOfRangeException(nameof(TopK), TopK, "must be ≥ 0 (0 = off)");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentOutOfRangeException(nameof(TopP), TopP, "must be in (0, 1]");
        if (!(RepetitionPenalty > 0)) throw new ArgumentOutOfRangeException(nameof(RepetitionPenalty), RepetitionPenalty, "must be > 0");
    }
}
