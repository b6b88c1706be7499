using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// Autoregressive decoding for one sequence: the prompt is run once (filling the KV cache), then one token per
/// step. Tokens stream out of <see cref="Generate"/> as they are chosen.
/// </summary>
public static class LlamaGenerator
{
    /// <summary>Yields up to <see cref="GenerationOptions.MaxNewTokens"/> new token ids after <paramref name="prompt"/>.</summary>
    public static IEnumerable<int> Generate(LlamaForCausalLM model, IReadOnlyList<int> prompt, GenerationOptions? options = null)
    {
        options ??= new GenerationOptions();
        options.Validate();
        if (prompt.Count == 0)
            throw new ArgumentException("the prompt needs at least one token (e.g. BOS)", nameof(prompt));
        return Run(model, prompt, options);
    }

    /// <summary>All new tokens at once; <paramref name="onToken"/> (optional) sees each as it is produced.</summary>
    public static List<int> GenerateAll(LlamaForCausalLM model, IReadOnlyList<int> prompt, GenerationOptions? options = null, Action<int>? onToken = null)
    {
        var result = new List<int>();
        foreach (var token in Generate(model, prompt, options))
        {
            result.Add(token);
            onToken?.Invoke(token);
        }
        return result;
    }

    static IEnumerable<int> Run(LlamaForCausalLM model, IReadOnlyList<int> prompt, GenerationOptions options)
    {
        var sequence = new List<int>(prompt);
        var stop = new HashSet<int>(options.StopTokens);
        using var cache = options.UseCache ? model.NewCache() : null;
        using var generator = options.Sample
            ? new Generator((ulong)(options.Seed ?? Random.Shared.NextInt64()), model.Device)
            : null;

        for (int step = 0; step < options.MaxNewTokens; step++)
        {
            int next;
            using (var scope = NewDisposeScope())
            using (torch.no_grad())
            {
                // With a cache, only positions not yet seen go in; without, the whole sequence every step.
                var fresh = cache is null ? sequence : sequence.Skip((int)cache.Length).ToList();
                var ids = torch.tensor(fresh.Select(t => (long)t).ToArray(), dtype: ScalarType.Int64).unsqueeze(0);
                var logits = model.Logits(ids, cache, lastOnly: true)[0, -1].to_type(ScalarType.Float32);
                next = NextToken(logits, sequence, options, generator);
            }
            sequence.Add(next);
            yield return next;
            if (stop.Contains(next)) yield break;
        }
    }

    /// <summary>Picks the next token from last-position logits <c>[vocab]</c> (float32) per the options.</summary>
    public static int NextToken(Tensor logits, IReadOnlyList<int> sequence, GenerationOptions options, Generator? generator)
    {
        using var scope = NewDisposeScope();
        var scores = logits;
        if (options.RepetitionPenalty != 1.0 && sequence.Count > 0)
            scores = ApplyRepetitionPenalty(scores, sequence, options.RepetitionPenalty);
        if (!options.Sample)
            return (int)scores.argmax().item<long>();

        scores = scores / options.Temperature;
        if (options.TopK > 0)
            scores = TopK(scores, options.TopK);
        if (options.TopP < 1.0)
            scores = TopP(scores, options.TopP);
        var probs = torch.softmax(scores, -1);
        return (int)probs.multinomial(1, generator: generator).item<long>();
    }

    /// <summary>HF RepetitionPenaltyLogitsProcessor: for each id in the sequence, divide its logit if positive, multiply if negative.</summary>
    public static Tensor ApplyRepetitionPenalty(Tensor scores, IReadOnlyList<int> sequence, double penalty)
    {
        using var scope = NewDisposeScope();
        var ids = torch.tensor(sequence.Distinct().Select(t => (long)t).ToArray(), dtype: ScalarType.Int64, device: scores.device);
        var picked = scores.gather(0, ids);
        var penalized = torch.where(picked < 0, picked * penalty, picked / penalty);
        return scores.scatter(0, ids, penalized).MoveToOuterDisposeScope();
    }

    /// <summary>Sets every logit below the k-th largest to -inf.</summary>
    public static Tensor TopK(Tensor scores, int k)
    {
        using var scope = NewDisposeScope();
        k = (int)Math.Min(k, scores.shape[^1]);
        var (values, _) = scores.topk(k);
        var threshold = values[-1];
        return scores.masked_fill(scores < threshold, double.NegativeInfinity).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// HF TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is ≤ 1 - p (always keeping
    /// the most likely one).
    /// </summary>
    public static Tensor TopP(Tensor scores, double p)
    {
        using var scope = NewDisposeScope();
        var (sorted, indices) = scores.sort(-1, descending: false);
        var cumulative = torch.softmax(sorted, -1).cumsum(-1);
        var removeSorted = cumulative <= (1 - p);
        removeSorted[-1] = torch.tensor(false);
        var remove = removeSorted.scatter(-1, indices, removeSorted);
        return scores.masked_fill(remove, double.NegativeInfinity).MoveToOuterDisposeScope();
    }
}
