using System.Text.Json;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.LlmTraining;

/// <summary>Tiny Llama folders for training tests: the reference config and tokenizer, random or reference weights.</summary>
public static class LlmTestModels
{
    public static string ReferenceModel => ReferenceData.PathOf("llm", "model");

    /// <summary>A model folder with the reference shape (hidden 64, 2 layers, vocab 256) and fresh random weights.</summary>
    public static string RandomModel(string folder, int seed = 0, double std = 0.05)
    {
        Directory.CreateDirectory(folder);
        File.Copy(Path.Combine(ReferenceModel, "config.json"), Path.Combine(folder, "config.json"), true);
        File.Copy(Path.Combine(ReferenceModel, "tokenizer.model"), Path.Combine(folder, "tokenizer.model"), true);
        var config = LlamaConfig.Load(folder);
        using var gen = new Generator((ulong)seed);
        using var model = new LlamaForCausalLM(config, init: WeightInit.Random, initStd: std, generator: gen);
        LlamaCheckpoint.SaveWeights(model, Path.Combine(folder, "model.safetensors"));
        return folder;
    }

    public static void WriteJsonl(string path, IEnumerable<object> rows) =>
        File.WriteAllLines(path, rows.Select(r => JsonSerializer.Serialize(r)));

    /// <summary>SHA-256 over every parameter's bytes (name order): a checksum of a model's weights.</summary>
    public static string Checksum(nn.Module model)
    {
        using var sha = System.Security.Cryptography.SHA256.Create();
        foreach (var (name, p) in model.named_parameters().OrderBy(p => p.name, StringComparer.Ordinal))
        {
            var nameBytes = System.Text.Encoding.UTF8.GetBytes(name);
            sha.TransformBlock(nameBytes, 0, nameBytes.Length, null, 0);
            using var c = p.detach().contiguous();
            var bytes = c.bytes.ToArray();
            sha.TransformBlock(bytes, 0, bytes.Length, null, 0);
        }
        sha.TransformFinalBlock([], 0, 0);
        return Convert.ToHexString(sha.Hash!);
    }
}
